"""``ircan tune`` and ``ircan eval`` on a recipe: the stages read and write the recipe's artifacts.

* :func:`tune_recipe`: select from the recipe's attribution store, grid-search on its dev rows,
  write ``tune.json`` (and, when asked, the choice into the recipe and ``neurons.json``);
* :func:`eval_recipe`: every method on the recipe's test rows (or a test file), resumable, with
  the report and plots.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..attribution import AttributionStore
from ..config import Recipe, Rule, write_recipe_choice
from ..data import ConflictExample, data_path
from ..errors import IrcanError
from ..files import atomic_write
from ..models import LoadedModel, load_model
from ..pipeline import load_checked_data, recipe_data, recipe_paths
from ..selection import select_units
from ..units import UnitSet, units_per_layer
from .methods import Setting, build_methods
from .report import write_report
from .runner import evaluate
from .tuning import TuneResult, tune


@dataclass
class TuneRun:
    """What :func:`tune_recipe` did."""

    result: TuneResult
    dev_rows: int
    report: Path
    written: bool


def _records(recipe: Recipe, recipe_path: str | Path) -> list[Any]:
    store = recipe_paths(recipe).store
    records = AttributionStore(store).all()
    if not records:
        raise IrcanError(f"no attribution results in {store}; run `ircan export {recipe_path}` first")
    return records


def tune_recipe(recipe: Recipe, recipe_path: str | Path, *, hs: list[int], betas: list[float], rules: list[Rule],
                min_agreement: float, max_drop: float, write: bool) -> TuneRun:
    """Grid-search the recipe's dev rows; write ``tune.json``, and with ``write`` the choice."""
    paths = recipe_paths(recipe)
    units = select_units(_records(recipe, recipe_path), recipe.selection.model_copy(update={"num_neurons": max(hs)}))
    lm = load_model(recipe.model, device=recipe.device, dtype=recipe.dtype)
    dev = recipe_data(recipe, lm).dev
    result = tune(lm.model, lm.tokenizer, units, dev, hs=hs, betas=betas, rules=rules,
                  min_agreement=min_agreement, max_drop=max_drop)
    report = atomic_write(paths.store / "tune.json", result.model_dump_json(indent=2))
    written = bool(write and result.best is not None)
    if written and result.best is not None:
        write_recipe_choice(recipe_path, result.best.h, result.best.beta, result.best.rule)
        units.top(result.best.h).scaled(result.best.beta, result.best.rule).save(paths.store / "neurons.json")
    return TuneRun(result, len(dev), report, written)


def _test_rows(recipe: Recipe, lm: LoadedModel, test: str | None, data_format: str, skip_invalid: bool,
               limit: int | None) -> tuple[list[ConflictExample], str, str]:
    """(rows, short name, identity) of the test split: ``test``'s rows, or the recipe's test split."""
    if test:
        path = Path(test)
        if path.resolve() == data_path(recipe.data_file()).resolve():
            raise IrcanError("--test is the recipe's attribution/tuning file; pass the test split "
                             "(or give the recipe [splits] and omit --test to use its test rows)")
        rows = load_checked_data(lm, str(path), data_format, skip_invalid=skip_invalid, limit=limit,
                                 template=recipe.prompt).examples
        return rows, path.stem, test
    if recipe.splits is not None:
        return recipe_data(recipe, lm).test[:limit], "test-split", f"{recipe.data} [test split]"
    raise IrcanError("pass --test FILE, or give the recipe [splits] so it has its own test rows")


def _tuned_units(recipe: Recipe, records: list[Any]) -> tuple[UnitSet, TuneResult | None, UnitSet | None]:
    """The shipped units (``neurons.json``), the tuning grid if any, and its best shrinking point."""
    paths = recipe_paths(recipe)
    units = UnitSet.load(paths.store / "neurons.json")
    if units.beta is None:
        units = units.scaled(recipe.beta, recipe.selection.rule)
    tune_file = paths.store / "tune.json"
    grid = TuneResult.model_validate_json(tune_file.read_text()) if tune_file.is_file() else None
    shrink = None
    if grid is not None and grid.best_shrink is not None:
        b = grid.best_shrink
        shrink = select_units(records, recipe.selection.model_copy(update={"num_neurons": b.h})).scaled(b.beta, b.rule)
    return units, grid, shrink


def eval_recipe(recipe: Recipe, recipe_path: str | Path, *, methods: list[str], test: str | None,
                data_format: str = "auto", skip_invalid: bool = False, limit: int | None = None,
                alpha: float = 0.5, seeds: int = 3, out: str | None = None) -> tuple[Path, Path]:
    """Every method on the test rows, resumable in ``out``; returns (report.md, out folder)."""
    records = _records(recipe, recipe_path)
    units, grid, shrink = _tuned_units(recipe, records)
    lm = load_model(recipe.model, device=recipe.device, dtype=recipe.dtype)
    examples, test_name, test_id = _test_rows(recipe, lm, test, data_format, skip_invalid, limit)
    n_layers = lm.model.config.num_hidden_layers
    built = build_methods(methods, Setting(units, n_layers, units_per_layer(lm.model), seeds, shrink))
    folder = Path(out) if out else recipe_paths(recipe).store.with_name(f"{recipe.name}.eval-{test_name}")
    settings = {"recipe": recipe.model_dump(), "test": test_id, "limit": limit, "alpha": alpha,
                "neurons": [u.model_dump() for u in units.neurons], "beta": units.beta, "rule": units.rule}
    results = evaluate(lm.model, lm.tokenizer, examples, built, folder, settings, alpha=alpha)
    top = select_units(records, recipe.selection.model_copy(update={"num_neurons": 100}))
    title = (f"{recipe.name} on {test_name} (h = {len(units.neurons)}, beta = {units.beta:g}, "
             f"rule = {units.rule or 'paper'})")
    report = write_report(results, folder, title, neurons=[u.model_dump() for u in top.neurons],
                          tune_grid=grid.model_dump() if grid else None, n_layers=n_layers)
    return report, folder
