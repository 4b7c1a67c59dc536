"""``ircan bench NAME``: one subcommand per benchmark of :data:`ircan_serve.benchmarks.BENCHMARKS`."""

from __future__ import annotations

import argparse

HELP = "benchmarks (ratios measured in one run)"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    from ..benchmarks import BENCHMARKS

    p = sub.add_parser("bench", help=HELP)
    bsub = p.add_subparsers(dest="bench", required=True)
    for name, (module, help_) in BENCHMARKS.items():
        module.add_arguments(bsub.add_parser(name, help=help_))
    return p


def run(ns: argparse.Namespace) -> None:
    from ..benchmarks import BENCHMARKS

    BENCHMARKS[ns.bench][0].main(ns)
