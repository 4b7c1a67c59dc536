"""``ircan serve``: vLLM's OpenAI server on a checkpoint; flags this command does not know go to vLLM.

Whether a flag of vLLM's takes a value is asked of vLLM's own argument parser (its public
``parse_known_args``), so ``serve --max-num-seqs 64 DIR`` does not take ``64`` for the folder.
"""

from __future__ import annotations

import argparse
from functools import cache
from typing import Any

from .flags import add_config_flags, config_flags, config_from_flags

HELP = "serve a checkpoint with vLLM's OpenAI server"
DESCRIPTION = ("Start vLLM's OpenAI-compatible server on an exported checkpoint, wait until /health answers, print "
               "the base URL, stop cleanly on Ctrl-C or SIGTERM. Flags this command does not know are passed to "
               "vLLM (e.g. --tensor-parallel-size 2).")
_PROBE = "__ircan_probe__"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    from ..serving.config import ServeConfig

    p = sub.add_parser("serve", help=HELP, description=DESCRIPTION)
    p.add_argument("dir", help="exported checkpoint folder (or, with --plain, any model spec)")
    p.add_argument("--plain", action="store_true",
                   help="serve a model without an ircan.json manifest (e.g. the base 'smollm2')")
    add_config_flags(p, ServeConfig, exclude=("extra_args",))
    return p


def own_flags() -> dict[str, bool]:
    """This command's flags -> whether each takes a value."""
    from ..serving.config import ServeConfig

    return {**config_flags(ServeConfig, exclude=("extra_args",)), "--plain": False, "-h": False, "--help": False}


@cache
def _vllm_parser() -> Any:
    from ..serving.command import vllm_arg_parser

    return vllm_arg_parser(exit_on_error=False)


def vllm_flag_takes_value(flag: str) -> bool:
    """Whether vLLM's parser reads a value after ``flag`` (True for a flag vLLM does not know either:
    a value is assumed to follow)."""
    try:
        parser = _vllm_parser()
    except Exception:
        return True
    try:
        _ns, extras = parser.parse_known_args([flag, _PROBE])
    except (argparse.ArgumentError, SystemExit):
        return True  # the probe was taken as the flag's value (and refused as one)
    return flag in extras or _PROBE not in extras


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Split ``ircan serve``'s arguments into its own and vLLM's, wherever they are placed."""
    own = own_flags()
    mine: list[str] = []
    passed: list[str] = []
    positional: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        name = token.split("=", 1)[0]
        if token == "--":
            positional += args[i + 1:]
            break
        if not token.startswith("-") or token == "-":
            positional.append(token)
        elif name in own:
            mine.append(token)
            if own[name] and "=" not in token and i + 1 < len(args):
                i += 1
                mine.append(args[i])
        else:
            passed.append(token)
            if ("=" not in token and i + 1 < len(args) and not args[i + 1].startswith("-")
                    and vllm_flag_takes_value(name)):
                i += 1
                passed.append(args[i])
        i += 1
    return positional + mine, passed


def run(ns: argparse.Namespace) -> None:
    from ..models import resolve_model
    from ..serving import ServeConfig, serve_forever

    config = config_from_flags(ns, ServeConfig)
    config = config.model_copy(update={"extra_args": list(ns.vllm_args)})
    model_dir = resolve_model(ns.dir) if ns.plain else ns.dir

    def announce(server: Any) -> None:
        print(f"serving {server.model_name!r} at {server.base_url}  (Ctrl-C stops; log: {server.log_path})",
              flush=True)

    serve_forever(model_dir, config, require_manifest=not ns.plain, announce=announce)
