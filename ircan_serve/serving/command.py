"""The vLLM server command line for a checkpoint: CPU-safe defaults, tool calling, vLLM's own parser."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
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


CPU_BLOCK_SIZE = 32
"""KV-cache block on a CPU (vLLM's CPU default is 128, its attention kernel needs a multiple of 32).
Prefix caching reuses whole blocks only, so at 128 a prompt under 128 tokens is never reused: served
CAD's many short prompts sharing a prefix were all computed in full. At 32, measured (SmolLM2, 2
cores): CAD 1.9x faster at 8 in flight, plain decoding no slower."""

KV_SEQUENCES = 16
"""Full-length sequences the CPU KV cache is sized for by default (fewer when memory is short)."""
KV_SHARE = 0.25
"""At most this share of the memory available at start goes to the CPU KV cache."""


@dataclass(frozen=True)
class CpuSizing:
    """The KV cache ``ircan serve`` gives vLLM on a CPU, and why."""

    kv_bytes: int
    max_model_len: int
    note: str


def cpu_sizing(model_dir: str | Path, max_model_len: int | None, available: int | None = None) -> CpuSizing:
    """Size vLLM's CPU KV cache from the model (bytes per token: 2 x layers x KV heads x head_dim x
    4 in float32) and this machine's free memory, instead of a fixed share: room for
    :data:`KV_SEQUENCES` sequences of ``max_model_len`` tokens (default: the model's own length,
    at most 2048), at most :data:`KV_SHARE` of the memory available now, at least one sequence."""
    import psutil

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    heads = cfg.get("num_attention_heads") or cfg.get("n_head") or 1
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or (cfg.get("hidden_size") or cfg.get("n_embd")) // heads
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    per_token = 2 * layers * kv_heads * head_dim * 4
    length = max_model_len or min(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048, 2048)
    free = available if available is not None else psutil.virtual_memory().available
    one = per_token * length
    if one > free * KV_SHARE:
        raise IrcanError(f"one sequence of {length} tokens needs {one / 2**30:.2f} GiB of KV cache, more than "
                         f"{KV_SHARE:.0%} of the {free / 2**30:.1f} GiB available; pass a smaller --max-model-len")
    kv = min(one * KV_SEQUENCES, int(free * KV_SHARE))
    note = (f"KV cache {kv / 2**30:.2f} GiB for {kv // one} sequences of {length} tokens "
            f"({per_token / 1024:.0f} KiB per token; {free / 2**30:.1f} GiB available)")
    return CpuSizing(kv, length, note)


def _given(extra: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in extra)


def build_command(model_dir: str | Path, config: ServeConfig, port: int, name: str) -> list[str]:
    """The vLLM server command line for ``model_dir`` with ``config``. On a CPU the KV cache is
    sized for the model and the machine (:func:`cpu_sizing`) unless a memory flag is given, in
    blocks of :data:`CPU_BLOCK_SIZE` tokens unless ``--block-size`` is given."""
    gpu = has_gpu()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", name,
        "--host", config.host, "--port", str(port),
        "--generation-config", "vllm",
    ]
    dtype = config.dtype or (None if gpu else "float32")
    eager = config.enforce_eager if config.enforce_eager is not None else not gpu
    max_len = config.max_model_len
    if dtype:
        cmd += ["--dtype", dtype]
    if config.gpu_memory_utilization:
        cmd += ["--gpu-memory-utilization", str(config.gpu_memory_utilization)]
    elif not gpu and not _given(config.extra_args, "--kv-cache-memory-bytes"):
        sizing = cpu_sizing(model_dir, max_len)
        max_len = sizing.max_model_len
        cmd += ["--kv-cache-memory-bytes", str(sizing.kv_bytes)]
        log.info("vLLM on CPU: %s", sizing.note)
    if eager:
        cmd.append("--enforce-eager")
    if not gpu and not _given(config.extra_args, "--block-size"):
        cmd += ["--block-size", str(CPU_BLOCK_SIZE)]
    if max_len:
        cmd += ["--max-model-len", str(max_len)]
    if config.enable_tools:
        cmd += ["--enable-auto-tool-choice", "--tool-call-parser", tool_call_parser(model_dir, config)]
    return cmd + list(config.extra_args)  # the API key goes in the environment (see VLLMServer.start)
