"""``ircan``: a thin command line over the library, one module per subcommand.

Each subcommand module has ``HELP``, ``register(subparsers)`` and ``run(namespace)``: it parses
its flags, calls one library function and prints a short summary. torch, transformers and vLLM
are imported inside ``run``, so ``ircan --help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from types import ModuleType

from ..errors import IrcanError
from . import attribute, bench, conflicts, demo, eval, export, known, select, serve, tune, verify

COMMANDS: dict[str, ModuleType] = {
    "attribute": attribute, "select": select, "export": export, "verify": verify, "serve": serve,
    "tune": tune, "eval": eval, "conflicts": conflicts, "known": known, "demo": demo, "bench": bench,
}
"""Subcommand -> its module, in the order ``ircan --help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ircan", description="IRCAN: find context-aware neurons, "
                                     "export a patched checkpoint, serve it with vLLM.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for _name, module in COMMANDS.items():
        module.register(sub).set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    vllm_args: list[str] = []
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command is not None and argv[command] == "serve":  # flags ircan serve does not know go to vLLM
        rest, vllm_args = serve.split_args(argv[command + 1:])
        argv = argv[: command + 1] + rest
    ns = parser.parse_args(argv)
    ns.vllm_args = vllm_args
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        ns.run(ns)
    except IrcanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished results are kept and a rerun resumes", file=sys.stderr)
        return 130
    return 0
