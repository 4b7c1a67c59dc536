"""The offline stage end to end: data -> attribution -> selection -> export.

:func:`find_context_neurons` is what a notebook calls; :func:`run_recipe` is what
``ircan export RECIPE`` calls. Both write the same artifacts the single-stage commands write,
so every stage can be rerun or inspected alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .attribution import Attribution, AttributionStore, attribute_examples
from .checkpoint.export import export_checkpoint
from .checkpoint.manifest import DatasetInfo, Manifest, sha256_file
from .config import AttributionConfig, Recipe, SelectionConfig, load_recipe
from .conflicts import KnownReport, known_facts
from .data import ConflictExample, LoadedData, check_prompt_lengths, data_path, formats, load_examples
from .data.contexts import context_format
from .errors import IrcanError
from .files import atomic_write_json
from .models import LoadedModel, load_model
from .prompts import PromptTemplate
from .selection import select_units
from .units import Unit, UnitSet, projection_path

log = logging.getLogger(__name__)


def find_context_neurons(
    model: Any,
    tokenizer: Any,
    examples: list[ConflictExample],
    attribution: AttributionConfig = AttributionConfig(),
    selection: SelectionConfig = SelectionConfig(),
    *,
    store: str | Path | None = None,
    header: dict[str, Any] | None = None,
    progress: bool = True,
) -> UnitSet:
    """Attribute every example (resumably, when ``store`` is given) and select the neurons."""
    results = attribute_examples(
        model, tokenizer, examples, attribution,
        store=AttributionStore(store) if store is not None else None,
        header=header, progress=progress,
    )
    return select_units(results, selection)


def max_prompt_tokens(model: Any) -> int:
    """The model's context length, from its config."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def read_recipe(path: str | Path) -> Recipe:
    """A recipe file (:func:`config.load_recipe`) whose data format and context formats are checked
    against the package's tables now, before a model loads, rather than minutes later when the
    rows are built.

    Raises:
        IrcanError: a name no table has, naming the recipe file, the key and the names there are.
    """
    recipe = load_recipe(path)
    try:
        if recipe.data_format != "auto":
            formats.data_format(recipe.data_format)
    except IrcanError as e:
        raise IrcanError(f"recipe {path}: {e}") from None
    for key, names in (("contexts", recipe.contexts), ("dev_contexts", recipe.dev_contexts or [])):
        try:
            for name in names:
                context_format(name)
        except IrcanError as e:
            raise IrcanError(f"recipe {path}: {key}: {e}") from None
    return recipe


def load_checked_data(
    lm: LoadedModel, source: str, data_format: str = "auto", *, skip_invalid: bool = False,
    limit: int | None = None, template: PromptTemplate | None = None,
) -> LoadedData:
    """Load data (rendered with ``template``, the recipe's prompt) and check every prompt fits."""
    loaded = load_examples(source, data_format, skip_invalid=skip_invalid, limit=limit,
                           template=template, tokenizer=lm.tokenizer)
    return check_prompt_lengths(
        loaded, lm.tokenizer, max_prompt_tokens(lm.model), skip_invalid=skip_invalid
    )


@dataclass
class RecipeData:
    """A recipe's rows, split: attribution, dev (h, beta, rule) and test (reporting only)."""

    attribution: list[ConflictExample]
    dev: list[ConflictExample]
    test: list[ConflictExample]
    skipped: list[str]
    template: PromptTemplate | None
    """The prompt template the rows were rendered with (recorded in the manifest)."""
    known: KnownReport | None = None
    corpus: list[ConflictExample] = field(kw_only=True)
    """Every row as loaded (after the known-facts filter), each context its one sentence: the
    documents a retriever indexes and that contexts in other formats are built from. Not
    ``attribution + dev + test``: with a contexts mix those rows hold built passages and top-k
    concatenations, which would leak a question's own document into its irrelevant context."""


def _known_rows(recipe: Recipe, lm: LoadedModel, rows: list[ConflictExample], cache: Path,
                progress: bool) -> tuple[list[ConflictExample], KnownReport]:
    """The known-facts filter, cached in ``cache`` (recomputed when model, data or prompts change;
    the key holds the names as given, so the cache stays valid when the project folder moves)."""
    key = {"model": lm.name, "data": str(recipe.data), "ids": hashlib.sha256(
        "\n".join(e.id + "\t" + e.prompt_without_context + "\t" + e.memorized for e in rows).encode()).hexdigest()}
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            report = KnownReport.model_validate(saved["report"])
            keep = set(report.kept_ids)
            return [e for e in rows if e.id in keep], report
    kept, report = known_facts(lm.model, lm.tokenizer, rows, progress=progress, source=str(recipe.data))
    atomic_write_json(cache, {"key": key, "report": report.model_dump()})
    return kept, report


def recipe_data(recipe: Recipe, lm: LoadedModel, *, progress: bool = True,
                out_root: str | Path = "export/out") -> RecipeData:
    """Load, filter and split a recipe's rows.

    With ``[splits]``: the first rows (after the known-facts filter, in file order) are for
    attribution, the next for dev, the rest (up to ``test``) for test, disjoint; the attribution rows
    are built in the recipe's ``contexts``, the dev rows in its ``dev_contexts`` (default the same), the
    test rows left as loaded (``in_format`` builds them per format). Without it, the
    paper's protocol: the ``limit`` rows are both the attribution and the dev rows, and there
    are no test rows in the file.

    Raises:
        IrcanError: too few rows for the splits (naming the file and the counts); a chat recipe
        on a tokenizer without a chat template (naming the recipe).
    """
    if recipe.prompt is not None and recipe.prompt.chat and getattr(lm.tokenizer, "chat_template", None) is None:
        raise IrcanError(f"{recipe.path}: [prompt] chat = true, but {recipe.model}'s tokenizer has no chat template; "
                         "set chat = false (a completion prompt) or use an Instruct model")
    data = load_checked_data(lm, recipe.data_file(), recipe.data_format, skip_invalid=recipe.skip_invalid,
                             limit=None if recipe.splits else recipe.limit, template=recipe.prompt)
    rows, known = data.examples, None
    if recipe.known_only:
        cache = recipe_paths(recipe, out_root).store.with_name(f"{recipe.name}.known.json")
        rows, known = _known_rows(recipe, lm, rows, cache, progress)
    if recipe.splits is None:
        built = _in_formats(recipe, lm, rows, rows, data.template)
        return RecipeData(built, built, [], data.skipped, data.template, known, corpus=rows)
    a, d = recipe.splits.attribution, recipe.splits.dev
    if len(rows) < a + d + 1:
        raise IrcanError(f"{recipe.data}: {len(rows)} usable rows"
                         + (f" ({known.kept} of {known.checked} known to the model)" if known else "")
                         + f", but the splits need {a} attribution + {d} dev + at least 1 test row")
    test = rows[a + d:]
    if recipe.splits.test is not None:
        test = test[: recipe.splits.test]
    return RecipeData(_in_formats(recipe, lm, rows[:a], rows, data.template),
                      _in_formats(recipe, lm, rows[a : a + d], rows, data.template, recipe.tuning_contexts), test,
                      data.skipped,
                      data.template, known, corpus=rows)


def _in_formats(recipe: Recipe, lm: LoadedModel, part: list[ConflictExample], corpus: list[ConflictExample],
                template: PromptTemplate | None, names: list[str] | None = None) -> list[ConflictExample]:
    """``part`` with its contexts in ``names`` (the recipe's formats), in turn, each row with its
    irrelevant-documents prompt (as loaded when both are the one sentence)."""
    names = names or recipe.contexts
    if template is None or (names == recipe.contexts == recipe.tuning_contexts == ["sentence"]):
        return part
    from .data import renderer
    from .data.contexts import ContextPool, mixed

    return mixed(part, names, ContextPool(corpus, recipe.top_k), renderer(template, lm.tokenizer))


def in_format(recipe: Recipe, lm: LoadedModel, rows: list[ConflictExample], corpus: list[ConflictExample],
              name: str, template: PromptTemplate | None) -> list[ConflictExample]:
    """``rows`` with every context in format ``name`` (the test split reported per format)."""
    return _in_formats(recipe, lm, rows, corpus, template, [name])


def attribute_rows(
    lm: LoadedModel, examples: list[ConflictExample], config: AttributionConfig, store: AttributionStore,
    header: dict[str, Any], *, workers: int = 1, address: str | None = None, dtype: str = "auto",
    device: str = "cpu", progress: bool = True,
) -> list[Attribution]:
    """Attribute ``examples`` into ``store``: in this process with ``lm``, or on ``workers`` Ray
    actors (each loading ``lm.source``) when ``workers > 1`` or a Ray ``address`` is given."""
    if workers > 1 or address:
        from .attribution.ray import attribute_on_ray

        return attribute_on_ray(lm.source, examples, config, workers=workers, store=store, header=header,
                                address=address, dtype=dtype, device=device, progress=progress)
    return attribute_examples(lm.model, lm.tokenizer, examples, config, store=store, header=header,
                              progress=progress)


def store_header(lm: LoadedModel, data: str, data_format: str) -> dict[str, Any]:
    """What an attribution store must match to be resumed: the model and data as the user named
    them (no machine paths, so a store resumes after the project folder moves)."""
    return {"model": lm.name, "data": str(data), "data_format": data_format}


@dataclass
class RecipePaths:
    """Where a recipe's artifacts go."""

    output: Path
    store: Path


def recipe_paths(recipe: Recipe, out_root: str | Path = "export/out") -> RecipePaths:
    """The checkpoint folder and, beside it, the attribution store (``NAME.attribution``)."""
    output = Path(recipe.output) if recipe.output else Path(out_root) / recipe.name
    return RecipePaths(output=output, store=output.with_name(output.name + ".attribution"))


@dataclass
class RecipeResult:
    """What ``ircan export RECIPE`` produced."""

    output: Path
    store: Path
    neurons_file: Path
    manifest: Manifest
    skipped: list[str]


def recipe_units(recipe: Recipe, records: list[Any]) -> UnitSet:
    """The units the recipe exports: its ``fitted`` list (``ircan tune --fit``), or the h neurons and
    g heads selected from ``records``, scaled by beta under the recipe's rule."""
    if not recipe.fitted:
        return select_units(records, recipe.selection).scaled(recipe.beta, recipe.selection.rule)
    try:
        units = [Unit.parse(text) for text in recipe.fitted]
    except IrcanError as e:
        raise IrcanError(f"{recipe.path}: fitted: {e} (rerun `ircan tune --fit`, or delete the list to use h and beta)"
                         ) from None
    n_examples = sum(getattr(r, "kind", "neuron") == "neuron" for r in records)
    return UnitSet(neurons=units, selection=recipe.selection, n_examples=n_examples, rule="fitted",
                   beta=max((u.scale or 1.0 for u in units), default=1.0))


def run_recipe(recipe: Recipe, *, force: bool = False, progress: bool = True,
               out_root: str | Path = "export/out") -> RecipeResult:
    """Attribute, select and export as ``recipe`` says; attribution resumes if interrupted."""
    paths = recipe_paths(recipe, out_root)
    output, store = paths.output, paths.store
    if output.exists() and not force:
        raise IrcanError(f"{output} already exists; pass --force to replace it")
    lm = load_model(recipe.model, device=recipe.device, dtype=recipe.dtype)
    for kind in recipe.attribution.units:  # before any work: a kind the model's family lacks
        try:
            projection_path(lm.model.config.model_type, kind)
        except IrcanError as e:
            raise IrcanError(f"{recipe.path}: [attribution] units: {e}") from None
    data = recipe_data(recipe, lm, progress=progress, out_root=out_root)
    records = attribute_rows(lm, data.attribution, recipe.attribution, AttributionStore(store),
                             store_header(lm, recipe.data, recipe.data_format), workers=recipe.workers,
                             address=recipe.ray_address, dtype=recipe.dtype, device=recipe.device,
                             progress=progress)
    neurons_file = store / "neurons.json"
    neurons = recipe_units(recipe, records)
    neurons.save(neurons_file)
    data_file = data_path(recipe.data_file())
    manifest = export_checkpoint(
        lm.source, neurons, None, output,
        base_model=recipe.model, served_model_name=recipe.name,
        dataset=DatasetInfo(
            source=recipe.data, format=recipe.data_format, n_examples=len(data.attribution),
            sha256=sha256_file(data_file) if data_file.is_file() else None,
        ),
        attribution=recipe.attribution.model_dump(),
        prompt_template=data.template, force=force, figures=evaluated_figures(recipe, out_root),
    )
    return RecipeResult(output, store, neurons_file, manifest, data.skipped)





def evaluated_figures(recipe: Recipe, out_root: str | Path = "export/out") -> dict[str, Any] | None:
    """First-token accuracies, intervals and McNemar tests of the recipe's latest ``ircan eval``
    (``NAME.eval-*/summary.json``), for the model card; None when it was not evaluated."""
    store = recipe_paths(recipe, out_root).store
    found = sorted(store.parent.glob(f"{recipe.name}.eval-*/summary.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        return None
    rows = json.loads(found[-1].read_text())
    methods = [{"method": r["method"], "accuracy": r["first_token.accuracy"], "ci": r.get("first_token.accuracy.ci"),
                "difference": r.get("first_token.difference"), "p_value": r.get("first_token.p_value")}
               for r in rows if r.get("first_token.accuracy") is not None]
    n = json.loads(found[-1].with_name("results.json").read_text())["methods"][0]["first_token"]["n"]
    return {"rows": n, "where": found[-1].parent.name, "methods": methods}
