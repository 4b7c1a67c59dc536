"""How ``ircan serve`` starts vLLM: the typed settings (``--help`` is generated from them)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ServeConfig(BaseModel):
    """How ``ircan serve`` starts vLLM. ``None`` fields get a default for the machine."""

    model_config = ConfigDict(extra="forbid")
    host: str = Field("127.0.0.1", description="Address to bind (127.0.0.1: this machine only).")
    port: int | None = Field(None, ge=1, le=65535, description="Port (default: a free one).")
    api_key: str | None = Field(None, description="Require this bearer token on /v1/* (default: "
                                "$VLLM_API_KEY; passed to vLLM in its environment, never on argv).")
    served_model_name: str | None = Field(
        None, description="Model name clients send (default: the manifest's, else the folder's)."
    )
    max_model_len: int | None = Field(None, description="Longest prompt + completion, in tokens (default: "
                                      "the model's length, at most 2048 on CPU; vLLM's own on GPU).")
    dtype: str | None = Field(None, description="Weights dtype (default: float32 on CPU, auto on GPU).")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1,
        description="Share of device memory for weights + KV cache (default: vLLM's on GPU; on CPU the KV "
        "cache is sized for the model and the free memory instead, and this share, if given, is of the "
        "memory node).",
    )
    enforce_eager: bool | None = Field(None, description="Disable graph capture (default: on CPU).")
    enable_tools: bool = Field(False, description="Let the model choose tools itself (tool_choice "
                               "'auto'): vLLM's auto tool choice with the tool-call parser of the "
                               "model's family. Forced tool calls and structured output need no flag.")
    tool_call_parser: str | None = Field(None, description="vLLM tool-call parser for --enable-tools "
                                         "(default: by the model's family; see TOOL_CALL_PARSERS).")
    log_file: str | None = Field(None, description="vLLM's log (default: a temporary file, removed when "
                                 "the server stops after a good start, kept when it fails).")
    startup_timeout: float = Field(600.0, gt=0, description="Seconds to wait for readiness.")
    extra_args: list[str] = Field(default_factory=list, description="More vLLM server flags, as given.")
