"""``ircan eval``: compare IRCAN with CAD, prompt baselines and ablations on a test split."""

from __future__ import annotations

import argparse
import sys

HELP = "compare IRCAN with CAD, prompt baselines and ablations on a test split"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    from ..data import FORMAT_CHOICES
    from ..data.contexts import CONTEXTS
    from ..evaluation.methods import METHODS

    p = sub.add_parser("eval", help=HELP)
    p.add_argument("recipe", help="the recipe whose attribution store holds neurons.json (after tune)")
    p.add_argument("--test", help="test split file (never the recipe's dev file); default: the "
                   "recipe's own test rows when it has [splits]")
    p.add_argument("--format", default="auto", choices=FORMAT_CHOICES)
    p.add_argument("--limit", type=int, help="only the first N test rows")
    p.add_argument("--skip-invalid", action="store_true")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                   help="methods to compare (default: all)")
    p.add_argument("--alpha", type=float, default=0.5, help="CAD strength")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the random-neuron ablations")
    p.add_argument("--out", help="output folder (default export/out/NAME.eval-TEST[-FORMAT]); reruns resume")
    p.add_argument("--contexts", nargs="+", default=["sentence"], metavar="FORMAT", choices=list(CONTEXTS),
                   help="context formats to report the recipe's test rows in, each apart "
                        f"(ircan_serve/data/contexts.py:CONTEXTS: {', '.join(CONTEXTS)})")
    return p


def run(ns: argparse.Namespace) -> None:
    from ..evaluation.recipe_runs import eval_recipe
    from ..pipeline import read_recipe

    recipe = read_recipe(ns.recipe)
    for context in ns.contexts:
        try:
            report, out = eval_recipe(recipe, ns.recipe, methods=ns.methods, test=ns.test, data_format=ns.format,
                                      skip_invalid=ns.skip_invalid, limit=ns.limit, alpha=ns.alpha, seeds=ns.seeds,
                                      out=ns.out if len(ns.contexts) == 1 else None, context=context)
        except KeyboardInterrupt:
            print("interrupted; finished methods are kept in the output folder's results.json", file=sys.stderr)
            raise
        print(report.read_text())
        print(f"written: {out}")
