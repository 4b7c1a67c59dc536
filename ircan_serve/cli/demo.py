"""``ircan demo``: original vs patched behind vLLM, RAG over each recipe's documents."""

from __future__ import annotations

import argparse

from ..errors import IrcanError

HELP = "RAG demo: original vs patched SmolLM2 behind vLLM, side by side"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help=HELP)
    p.add_argument("--recipe", action="append",
                   help="a recipe whose checkpoint (export/out/NAME) is compared on its held-out rows; "
                        "repeat for several (default: smollm2-conflicts and smollm2-counterfact)")
    p.add_argument("--base", default="smollm2", help="the original model to compare with")
    p.add_argument("--out", default="export/out/demo.json", help="where to write the rates and tests (JSON)")
    return p


def run(ns: argparse.Namespace) -> None:
    from ..config import load_recipe
    from ..demo import print_demo, run_demo
    from ..files import atomic_write_json
    from ..pipeline import recipe_paths

    recipes = ns.recipe or ["export/smollm2-conflicts.toml", "export/smollm2-counterfact.toml"]
    sets = []
    for r in recipes:
        checkpoint = recipe_paths(load_recipe(r)).output
        if not checkpoint.is_dir():
            raise IrcanError(f"{checkpoint} does not exist; build it with `ircan export {r}`")
        sets.append((checkpoint, r))
    summaries = print_demo(run_demo(sets, base=ns.base))
    if ns.out:
        atomic_write_json(ns.out, summaries)
        print(f"written: {ns.out}")
