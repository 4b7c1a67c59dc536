"""The vLLM server command line for a checkpoint: CPU-safe defaults, tool calling, vLLM's own parser."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from ..errors import IrcanError
from .config import ServeConfig

log = logging.getLogger(__name__)


def vllm_arg_parser(**kwargs: Any) -> Any:
    """vLLM's own OpenAI-server argument parser (raises ImportError where vLLM is absent);
    ``kwargs`` go to its ``ArgumentParser`` (e.g. ``exit_on_error=False``)."""
    import importlib

    from vllm.utils.argparse_utils import FlexibleArgumentParser

    try:  # the module moved between vLLM releases
        cli_args = importlib.import_module("vllm.entrypoints.launchers.cli_args")
    except ImportError:
        cli_args = importlib.import_module("vllm.entrypoints.openai.cli_args")
    return cli_args.make_arg_parser(FlexibleArgumentParser(**kwargs))


def has_gpu() -> bool:
    """Whether a CUDA device is visible (decides the CPU-safe defaults)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


TOOL_CALL_PARSERS: dict[str, str] = {
    "llama": "llama3_json",
    "mistral": "mistral",
    "qwen2": "hermes",
    "qwen3": "hermes",
    "granite": "granite",
    "phi3": "phi4_mini_json",
}
"""vLLM's tool-call parser per ``config.model_type``, for ``--enable-tools``."""

PARSER_TOKENS: dict[str, str] = {"llama3_json": "<|python_tag|>", "hermes": "<tool_call>",
                                 "mistral": "[TOOL_CALLS]"}
"""The special token a parser needs in the tokenizer (vLLM refuses to start without it)."""

FALLBACK_PARSER = "pythonic"
"""For a model of a family whose tool format its tokenizer lacks (SmolLM2 is a Llama without
Llama 3's <|python_tag|>): calls written as a Python list, which needs no special token."""


def _has_token(model_dir: Path, token: str) -> bool:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return True  # cannot tell: let vLLM decide
    data = json.loads(path.read_text())
    return token in data.get("model", {}).get("vocab", {}) or any(
        t.get("content") == token for t in data.get("added_tokens", []))


def tool_call_parser(model_dir: str | Path, config: ServeConfig) -> str:
    """The parser ``--enable-tools`` uses: the configured one, else the family's (or
    :data:`FALLBACK_PARSER` when the tokenizer lacks the family's tool token)."""
    if config.tool_call_parser:
        return config.tool_call_parser
    model_dir = Path(model_dir)
    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type", "?")
    try:
        parser = TOOL_CALL_PARSERS[model_type]
    except KeyError:
        raise IrcanError(f"no default tool-call parser for model type {model_type!r}: pass "
                         "--tool-call-parser NAME (see vLLM's tool calling docs)") from None
    token = PARSER_TOKENS.get(parser)
    if token and not _has_token(model_dir, token):
        log.warning("the tokenizer of %s has no %s token, which vLLM's %s tool parser needs; using %s",
                    model_dir, token, parser, FALLBACK_PARSER)
        return FALLBACK_PARSER
    return parser


def build_command(model_dir: str | Path, config: ServeConfig, port: int, name: str) -> list[str]:
    """The vLLM server command line for ``model_dir`` with ``config``."""
    gpu = has_gpu()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", name,
        "--host", config.host, "--port", str(port),
        "--generation-config", "vllm",
    ]
    dtype = config.dtype or (None if gpu else "float32")
    mem = config.gpu_memory_utilization or (None if gpu else 0.2)
    eager = config.enforce_eager if config.enforce_eager is not None else not gpu
    if dtype:
        cmd += ["--dtype", dtype]
    if mem:
        cmd += ["--gpu-memory-utilization", str(mem)]
    if eager:
        cmd.append("--enforce-eager")
    if config.max_model_len:
        cmd += ["--max-model-len", str(config.max_model_len)]
    if config.enable_tools:
        cmd += ["--enable-auto-tool-choice", "--tool-call-parser", tool_call_parser(model_dir, config)]
    return cmd + list(config.extra_args)  # the API key goes in the environment (see VLLMServer.start)


