"""``ircan demo``: original vs patched behind vLLM, RAG over each recipe's documents."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import IrcanError

HELP = ("RAG demo: original, instruction, patch, patch + instruction and CAD, served by vLLM, one table per "
        "setting (retrieved top 1 and top 4, passages, irrelevant documents)")
DEFAULT_RECIPES = ("export/smollm2-conflicts.toml", "export/smollm2-counterfact.toml",
                   "export/smollm2-counterfact-topk.toml")
"""The recipes ``ircan demo`` compares without ``--recipe`` (``make demo`` builds their checkpoints)."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    from ..demo.run import SETTINGS  # the settings table imports no torch

    p = sub.add_parser("demo", help=HELP)
    p.add_argument("--recipe", action="append",
                   help="a recipe whose checkpoint (export/out/NAME) is compared on its held-out rows; "
                        f"repeat for several (default: {', '.join(DEFAULT_RECIPES)})")
    p.add_argument("--base", default="smollm2", help="the original model to compare with")
    p.add_argument("--out", default="export/out/demo.json",
                   help="where to write the rates and tests (JSON; rewritten after each method, so a run cut short "
                        "keeps what it answered)")
    p.add_argument("--setting", dest="settings", nargs="+",
                   default=["retrieved-1", "retrieved-4", "passage-list", "irrelevant"],
                   help="where contexts come from, one table each (ircan_serve/demo/run.py:SETTINGS: "
                        f"{', '.join(SETTINGS)})")
    p.add_argument("--limit", type=int, help="ask only the first N held-out questions of each recipe")
    p.add_argument("--cad", type=float, default=0.5, metavar="ALPHA",
                   help="served CAD and IRCAN + CAD with this alpha (two streams; see README); --cad -1: none")
    p.add_argument("--cad-limit", type=int, default=100, help="CAD on the first N questions of each setting")
    p.add_argument("--cad-settings", nargs="+", metavar="SETTING",
                   help="CAD only in these settings (default: every --setting)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight per method")
    return p


def run(ns: argparse.Namespace) -> None:
    from ..demo import demo_setting, print_demo, run_demo, summarize_set
    from ..files import atomic_write_json
    from ..pipeline import read_recipe, recipe_paths

    for name in ns.settings:
        demo_setting(name)
    if ns.cad_settings and not set(ns.cad_settings) <= set(ns.settings):
        raise IrcanError(f"--cad-settings {' '.join(ns.cad_settings)}: each must be one of --setting "
                         f"({' '.join(ns.settings)})")
    recipes = ns.recipe or list(DEFAULT_RECIPES)
    sets = []
    for r in recipes:
        checkpoint = recipe_paths(read_recipe(r)).output
        if not checkpoint.is_dir():
            raise IrcanError(f"{checkpoint} does not exist; build it with `ircan export {r}`")
        sets.append((checkpoint, r))

    def save(partial: list[Any]) -> None:  # after each method: a run cut short keeps what it answered
        atomic_write_json(ns.out, [summarize_set(s) for s in partial])

    sets_done = run_demo(sets, base=ns.base, settings=ns.settings, limit=ns.limit,
                         cad_alpha=None if ns.cad < 0 else ns.cad, cad_limit=ns.cad_limit,
                         cad_settings=ns.cad_settings, concurrency=ns.concurrency,
                         save=save if ns.out else None)
    summaries = print_demo(sets_done)
    if ns.out:
        atomic_write_json(ns.out, summaries)
        print(f"written: {ns.out}")
