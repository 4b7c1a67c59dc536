"""``ircan tune`` and ``ircan eval`` on a recipe: the stages read and write the recipe's artifacts.

* :func:`tune_recipe`: select from the recipe's attribution store, grid-search on its dev rows,
  write ``tune.json`` (and, when asked, the choice into the recipe and ``neurons.json``);
* :func:`eval_recipe`: every method on the recipe's test rows (or a test file), resumable, with
  the report and plots.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..attribution import AttributionStore
from ..config import Recipe, Rule, write_recipe_choice
from ..data import ConflictExample, data_path
from ..data.contexts import format_of
from ..errors import IrcanError
from ..files import atomic_write
from ..models import LoadedModel, load_model
from ..pipeline import RecipeData, in_format, load_checked_data, recipe_data, recipe_paths, recipe_units
from ..selection import select_units
from ..units import UnitSet, units_per_layer
from .methods import Setting, build_methods
from .metrics import SIDE_CHECKS
from .report import write_report
from .runner import evaluate
from .tuning import TuneResult, tune

if TYPE_CHECKING:
    from .fit_ranks import Rank


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


def overall_rows(data: RecipeData) -> list[ConflictExample]:
    """The rows of tuning's checks held over all rows (the irrelevant documents): every row that is
    not a test row. Scoring units never optimizes what the patch does there (``baseline =
    "irrelevant"`` starts its paths at those prompts, no more), and a check on 200 dev rows alone
    cannot bound a 2-point drop elsewhere (on the mix recipe it saw none where the 338 test rows
    lost 3.8 points). Without ``[splits]`` the attribution rows are the dev rows."""
    return data.dev if data.attribution is data.dev else data.attribution + data.dev


def tune_recipe(recipe: Recipe, recipe_path: str | Path, *, hs: list[int], betas: list[float], rules: list[Rule],
                min_agreement: float, max_drop: float, write: bool, gs: list[int] | None = None) -> TuneRun:
    """Grid-search the recipe's dev rows; write ``tune.json``, and with ``write`` the choice."""
    paths = recipe_paths(recipe)
    gs = gs or [0]
    units = select_units(_records(recipe, recipe_path),
                         recipe.selection.model_copy(update={"num_neurons": max(hs), "num_heads": max(gs)}))
    lm = load_model(recipe.model, device=recipe.device, dtype=recipe.dtype)
    data = recipe_data(recipe, lm)
    dev = data.dev
    result = tune(lm.model, lm.tokenizer, units, dev, hs=hs, betas=betas, rules=rules, gs=gs,
                  min_agreement=min_agreement, max_drop=max_drop, overall_rows=overall_rows(data))
    report = atomic_write(paths.store / "tune.json", result.model_dump_json(indent=2))
    written = bool(write and result.best is not None)
    if written and result.best is not None:
        best = result.best
        write_recipe_choice(recipe_path, best.h, best.beta, best.rule, g=best.g if max(gs) else None)
        units.top(best.h, best.g).scaled(best.beta, best.rule).save(paths.store / "neurons.json")
    return TuneRun(result, len(dev), report, written)


def _test_rows(recipe: Recipe, lm: LoadedModel, test: str | None, data_format: str, skip_invalid: bool,
               limit: int | None, context: str = "sentence") -> tuple[list[ConflictExample], str, str]:
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
        data = recipe_data(recipe, lm)
        rows = in_format(recipe, lm, data.test[:limit], data.corpus, context, data.template)
        suffix = "" if context == "sentence" else f"-{context}"
        return rows, f"test-split{suffix}", f"{recipe.data} [test split, {context}{_own_documents(data.test, rows)}]"
    raise IrcanError("pass --test FILE, or give the recipe [splits] so it has its own test rows")


def _own_documents(rows: list[ConflictExample], built: list[ConflictExample]) -> str:
    """How often a retrieved context holds the row's own document (the ``topk`` format), as text."""
    retrieved = [b for b in built if format_of(b) == "topk"]
    if not retrieved:
        return ""
    own = sum((e.context or "") in b.context for e, b in zip(rows, built) if format_of(b) == "topk" and b.context)
    return f"; own document among the top k for {own}/{len(retrieved)}"


def _tuned_units(recipe: Recipe, records: list[Any]) -> tuple[UnitSet, TuneResult | None, UnitSet | None]:
    """The units the recipe exports, the tuning grid if any, and its best shrinking point."""
    paths = recipe_paths(recipe)
    units = recipe_units(recipe, records)
    tune_file = paths.store / "tune.json"
    grid = TuneResult.model_validate_json(tune_file.read_text()) if tune_file.is_file() else None
    shrink = None
    if grid is not None and grid.best_shrink is not None:
        b = grid.best_shrink
        shrink = select_units(records, recipe.selection.model_copy(update={"num_neurons": b.h, "num_heads": b.g})
                              ).scaled(b.beta, b.rule)
    return units, grid, shrink


def eval_recipe(recipe: Recipe, recipe_path: str | Path, *, methods: list[str], test: str | None,
                data_format: str = "auto", skip_invalid: bool = False, limit: int | None = None,
                alpha: float = 0.5, seeds: int = 3, out: str | None = None, context: str = "sentence"
                ) -> tuple[Path, Path]:
    """Every method on the test rows (their contexts in format ``context``), resumable in ``out``;
    returns (report.md, out folder)."""
    records = _records(recipe, recipe_path)
    units, grid, shrink = _tuned_units(recipe, records)
    lm = load_model(recipe.model, device=recipe.device, dtype=recipe.dtype)
    examples, test_name, test_id = _test_rows(recipe, lm, test, data_format, skip_invalid, limit, context)
    n_layers = lm.model.config.num_hidden_layers
    built = build_methods(methods, Setting(units, n_layers, units_per_layer(lm.model), seeds, shrink,
                                           _chat_instructed(recipe, lm)))
    folder = Path(out) if out else recipe_paths(recipe).store.with_name(f"{recipe.name}.eval-{test_name}")
    settings = {"recipe": recipe.model_dump(), "test": test_id, "limit": limit, "alpha": alpha,
                "side_checks": list(SIDE_CHECKS),  # results made before a check existed lack it: not resumed
                "neurons": [u.model_dump() for u in units.neurons], "beta": units.beta, "rule": units.rule}
    results = evaluate(lm.model, lm.tokenizer, examples, built, folder, settings, alpha=alpha)
    top = select_units(records, recipe.selection.model_copy(update={"num_neurons": 100, "num_heads": 0}))
    title = (f"{recipe.name} on {test_id} ({', '.join(u.written for u in units.neurons)}, "
             f"rule = {units.rule or 'paper'})")
    report = write_report(results, folder, title, neurons=[u.model_dump() for u in top.neurons],
                          tune_grid=grid.model_dump() if grid else None, n_layers=n_layers)
    return report, folder


def _chat_instructed(recipe: Recipe, lm: LoadedModel) -> Any:
    """Chat recipes: each row rendered again with the instruction in its user message."""
    if recipe.prompt is None or not recipe.prompt.chat:
        return None
    from ..data import renderer
    from ..prompts import instructed

    render = renderer(instructed(recipe.prompt), lm.tokenizer)
    return lambda e: render(e.question or "", e.context)


def fit_recipe(recipe: Recipe, recipe_path: str | Path, *, candidates: int, max_units: int,
               factors: list[float], min_agreement: float, max_drop: float, write: bool,
               rank: Rank = "accuracy", from_choice: bool = False,
               max_rounds: int | None = None) -> tuple[Any, Path]:
    """:func:`~.fitting.fit_factors` on the recipe's dev rows, from its ``candidates`` most frequent
    units of each attributed kind (with ``from_choice``, starting from the units the recipe exports
    now); writes ``fit.json`` and, with ``write``, the fitted units into the recipe's ``fitted`` list
    (and ``neurons.json``)."""
    from .fitting import fit_factors

    paths = recipe_paths(recipe)
    records = _records(recipe, recipe_path)
    pool = select_units(records, recipe.selection.model_copy(update={"num_neurons": candidates, "num_heads": candidates}))
    start = recipe_units(recipe, records).neurons if from_choice else []
    lm = load_model(recipe.model, device=recipe.device, dtype=recipe.dtype)
    data = recipe_data(recipe, lm)
    dev = data.dev
    result = fit_factors(lm.model, lm.tokenizer, pool, dev, factors=factors, max_units=max_units,
                         min_agreement=min_agreement, max_drop=max_drop, overall_rows=overall_rows(data),
                         start=start, rank=rank, max_rounds=max_rounds)
    report = atomic_write(paths.store / "fit.json", result.model_dump_json(indent=2))
    if write and result.units.neurons:
        result.units.save(paths.store / "neurons.json")
        write_recipe_choice(recipe_path, result.units.count("neuron"), result.units.beta or 1.0, None,
                            g=result.units.count("head"), fitted=[u.written for u in result.units.neurons])
    return result, report
