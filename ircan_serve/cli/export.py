"""``ircan export``: write a patched checkpoint, from a recipe (all stages) or a neuron file."""

from __future__ import annotations

import argparse

from ..errors import IrcanError
from .flags import print_summary

HELP = "write a patched checkpoint (from a recipe: all stages)"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help=HELP)
    p.add_argument("recipe", nargs="?", help="export/*.toml recipe: attribute + select + export")
    p.add_argument("--model", help="base model (without a recipe)")
    p.add_argument("--neurons", help="neurons.json (without a recipe)")
    p.add_argument("--num-neurons", type=int, help="use only the first h neurons of the file")
    p.add_argument("--beta", type=float, help="scale factor (overrides the recipe / neurons file)")
    p.add_argument("-o", "--output", help="checkpoint folder")
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    return p


def _from_recipe(ns: argparse.Namespace) -> None:
    from ..pipeline import read_recipe, run_recipe

    recipe = read_recipe(ns.recipe)
    if ns.output:
        recipe = recipe.model_copy(update={"output": ns.output})
    if ns.beta is not None:
        recipe = recipe.model_copy(update={"beta": ns.beta})
    result = run_recipe(recipe, force=ns.force)
    m = result.manifest
    print_summary(f"export {recipe.name}", {
        "model": recipe.model, "data": f"{recipe.data} ({m.dataset.n_examples if m.dataset else '?'} rows)",
        "skipped rows": len(result.skipped) or "none",
        "units": ", ".join(u.label for u in m.neurons), "beta": m.beta,
        "attribution store": result.store, "checkpoint": result.output,
    })


def run(ns: argparse.Namespace) -> None:
    if ns.recipe:
        _from_recipe(ns)
        return
    if not (ns.model and ns.neurons):
        raise IrcanError("give a RECIPE, or --model and --neurons (and --beta, --output)")
    from transformers import AutoConfig

    from ..checkpoint.export import check_units, export_checkpoint
    from ..models import resolve_model
    from ..units import UnitSet

    units = UnitSet.load(ns.neurons)
    check_units(units, AutoConfig.from_pretrained(resolve_model(ns.model)), str(ns.neurons))
    if ns.beta is None and units.beta is None:
        raise IrcanError("no beta: pass --beta or set it in the neurons file (`ircan select --beta`)")
    if not ns.output:
        raise IrcanError("pass --output DIR for the checkpoint folder")
    if ns.num_neurons:
        units = units.top(ns.num_neurons)
    if ns.beta is not None:  # the file's rule (default: the paper's) with the new beta
        units = units.scaled(ns.beta, "signed" if units.rule == "signed" else "paper")
    manifest = export_checkpoint(resolve_model(ns.model), units, None, ns.output, base_model=ns.model, force=ns.force)
    print_summary("export", {"checkpoint": ns.output, "units": len(manifest.neurons), "beta": manifest.beta,
                             "rule": manifest.rule, "weight files": len(manifest.files)})
