"""``ircan tune``: choose the rule, h and beta on the recipe's dev rows (reversible reweighting)."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import IrcanError

HELP = "choose the rule, h and beta on the recipe's dev rows (reversible reweighting)"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    from ..config import PAPER_BETA, PAPER_H, SMALL_BETA
    from ..evaluation.fit_ranks import RANKS

    p = sub.add_parser("tune", help=HELP)
    p.add_argument("recipe", help="export/*.toml recipe whose attribution store exists")
    p.add_argument("--h", type=int, nargs="+", default=PAPER_H, help="h values (default: the paper's 1..16)")
    p.add_argument("--g", type=int, nargs="+", default=[0],
                   help="attention heads with the h neurons (needs heads attributed: [attribution] units)")
    p.add_argument("--beta", type=float, nargs="+", default=SMALL_BETA + PAPER_BETA,
                   help="beta values (default: 0, 0.5, 1.5 and the paper's 2..20)")
    p.add_argument("--min-agreement", type=float, default=0.8,
                   help="grid points whose top-1 agreement with the original on prompts without "
                        "context falls below this are collapsed and never chosen")
    p.add_argument("--rule", nargs="+", default=["paper", "signed"], choices=["paper", "signed"],
                   help="reweighting rules to search (default both)")
    p.add_argument("--max-drop", type=float, default=0.02,
                   help="grid points that lose more than this accuracy on the dev rows' locality facts or "
                        "agreeing contexts, or on irrelevant documents (the memorized answer kept; every row "
                        "that is not a test row) are collapsed and never chosen")
    p.add_argument("--no-write", dest="write", action="store_false",
                   help="only report; do not write the choice into the recipe")
    p.add_argument("--fit", action="store_true",
                   help="instead of the grid: fit a factor per unit, greedily, on the dev rows under the same "
                        "checks (evaluation/fitting.py)")
    p.add_argument("--candidates", type=int, default=8, help="--fit: the most frequent units of each kind tried")
    p.add_argument("--max-units", type=int, default=6, help="--fit: at most this many units")
    p.add_argument("--factors", type=float, nargs="+", default=[0.0, 0.5, 2.0, 5.0, 10.0],
                   help="--fit: the factors tried per unit")
    p.add_argument("--rank", choices=list(RANKS), default="accuracy",
                   help="--fit: how a round orders its tries before checking them: "
                        + "; ".join(f"{k}: {v.description}" for k, v in RANKS.items()))
    p.add_argument("--from-choice", action="store_true",
                   help="--fit: start from the units the recipe exports now (its grid choice or fitted list) and "
                        "also try moving each one's factor or dropping it, instead of starting from none")
    p.add_argument("--max-rounds", type=int, default=None,
                   help="--fit: stop after this many rounds (default: --max-units, plus the starting units)")
    return p


def run(ns: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..evaluation.metrics import SIDE_CHECKS
    from ..evaluation.recipe_runs import tune_recipe
    from ..pipeline import read_recipe

    recipe = read_recipe(ns.recipe)
    if ns.fit:
        _fit(recipe, ns)
        return
    done = tune_recipe(recipe, ns.recipe, hs=ns.h, betas=ns.beta, rules=ns.rule, gs=ns.g,
                       min_agreement=ns.min_agreement, max_drop=ns.max_drop, write=ns.write)
    result = done.result
    which = ("the recipe's attribution rows (no \\[splits]: the paper's protocol)" if recipe.splits is None
             else "rows disjoint from the attribution rows")
    table = Table(title=f"tune {recipe.name}: {done.dev_rows} dev rows ({', '.join(recipe.tuning_contexts)}), {which}")
    for col in ("rule", "h", "beta", "dev accuracy", "dev stubbornness", "top-1 agreement (no context)",
                *SIDE_CHECKS, "KL", "collapsed"):
        table.add_column(col, justify="right")
    for row in result.table():
        table.add_row(*row)
    console = Console(width=160)
    console.print(table)
    oc = result.original_checks
    console.print(f"original: accuracy {result.original.accuracy:.3f}, stubbornness "
                  f"{result.original.stubbornness:.3f}, locality {oc.locality}, agreeing {oc.agreeing}, "
                  f"irrelevant {oc.irrelevant} (over {result.overall_rows} rows: every row not in test); "
                  f"grid of {len(result.grid)} points in {result.seconds:.0f} s")
    if result.best_shrink is not None:
        b = result.best_shrink
        console.print(f"best shrinking point (reported apart, not chosen): {b.rule} h = {b.h}, beta = {b.beta:g} "
                      f"(dev accuracy {b.dev.accuracy:.3f})")
    if result.best is None:
        raise IrcanError("every enhancing grid point collapsed (agreement < "
                         f"{ns.min_agreement} or a side check dropped > {ns.max_drop}); nothing written")
    best = result.best
    console.print(f"chosen: {best.rule} h = {best.h}, g = {best.g}, beta = {best.beta:g} (dev accuracy {best.dev.accuracy:.3f}); "
                  f"grid in {done.report}")
    if done.written:
        console.print(f"written to {ns.recipe}; rebuild with `ircan export {ns.recipe} --force`")


MOVES = {"start": "from", "add": "+", "change": "~", "drop": "-"}
"""How ``ircan tune --fit`` marks each step's move (:class:`~ircan_serve.evaluation.fitting.FitStep`)."""


def _fit(recipe: Any, ns: argparse.Namespace) -> None:
    from rich.console import Console

    from ..evaluation.recipe_runs import fit_recipe

    result, report = fit_recipe(recipe, ns.recipe, candidates=ns.candidates, max_units=ns.max_units,
                                factors=ns.factors, min_agreement=ns.min_agreement, max_drop=ns.max_drop,
                                write=ns.write, rank=ns.rank, from_choice=ns.from_choice,
                                max_rounds=ns.max_rounds)
    console = Console(width=160)
    console.print(f"original: dev accuracy {result.original.accuracy:.3f}, by format {result.original_by_format} "
                  f"(dev rows in {', '.join(recipe.tuning_contexts)})")
    for step in result.steps:
        p = step.point
        what = ", ".join(step.units) if step.move == "start" else f"{step.unit.label} x{step.unit.scale:g}"
        console.print(f"{MOVES[step.move]} {what}: dev accuracy {p.dev.accuracy:.3f}, agreement "
                      f"{p.agreement:.2f}, locality {p.checks.locality}, agreeing {p.checks.agreeing}, "
                      f"irrelevant {p.checks.irrelevant}, "
                      f"by format {p.by_format} ({step.tried} tries)")
    console.print(f"{len(result.units.neurons)} units ({', '.join(u.written for u in result.units.neurons)}) "
                  f"in {result.seconds:.0f} s; fit in {report}")
    if ns.write and result.units.neurons:
        console.print(f"written to {ns.recipe} and neurons.json; rebuild with `ircan export {ns.recipe} --force`")
