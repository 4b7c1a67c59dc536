"""The offline stage end to end: data -> attribution -> selection -> export.

:func:`find_context_neurons` is what a notebook calls; :func:`run_recipe` is what
``ircan export RECIPE`` calls. Both write the same artifacts the single-stage commands write,
so every stage can be rerun or inspected alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .attribution import AttributionStore, attribute_examples
from .config import AttributionConfig, Recipe, SelectionConfig
from .data import (
    SHIPPED_SET,
    TEMPLATES,
    ConflictExample,
    LoadedData,
    check_prompt_lengths,
    load_examples,
    shipped_conflicts_path,
)
from .export import DatasetInfo, Manifest, export_checkpoint, sha256_file
from .models import LoadedModel, load_model
from .selection import NeuronSet, select_neurons

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
) -> NeuronSet:
    """Attribute every example (resumably, when ``store`` is given) and select the neurons."""
    results = attribute_examples(
        model, tokenizer, examples, attribution,
        store=AttributionStore(store) if store is not None else None,
        header=header, progress=progress,
    )
    return select_neurons((r.scores for r in results), selection)


def max_prompt_tokens(model: Any) -> int:
    """The model's context length, from its config."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def load_checked_data(
    lm: LoadedModel, source: str, data_format: str = "auto", *, skip_invalid: bool = False,
    limit: int | None = None,
) -> LoadedData:
    """Load data and check every prompt fits the model's context."""
    loaded = load_examples(source, data_format, skip_invalid=skip_invalid, limit=limit)  # type: ignore[arg-type]
    return check_prompt_lengths(
        loaded, lm.tokenizer, max_prompt_tokens(lm.model), skip_invalid=skip_invalid
    )


def store_header(lm: LoadedModel, data: str, data_format: str) -> dict[str, Any]:
    """What an attribution store must match to be resumed."""
    return {"model": lm.name, "model_source": lm.source, "data": str(data), "data_format": data_format}


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


def run_recipe(recipe: Recipe, *, force: bool = False, progress: bool = True,
               out_root: str | Path = "export/out") -> RecipeResult:
    """Attribute, select and export as ``recipe`` says; attribution resumes if interrupted."""
    from .errors import IrcanError

    paths = recipe_paths(recipe, out_root)
    output, store = paths.output, paths.store
    if output.exists() and not force:
        raise IrcanError(f"{output} already exists; pass --force to replace it")
    lm = load_model(recipe.model)
    data = load_checked_data(lm, recipe.data, recipe.data_format,
                             skip_invalid=recipe.skip_invalid, limit=recipe.limit)
    neurons = find_context_neurons(
        lm.model, lm.tokenizer, data.examples, recipe.attribution, recipe.selection,
        store=store, header=store_header(lm, recipe.data, recipe.data_format), progress=progress,
    )
    neurons = neurons.model_copy(update={"beta": recipe.beta})
    neurons_file = store / "neurons.json"
    neurons.save(neurons_file)
    data_path = shipped_conflicts_path() if recipe.data == SHIPPED_SET else Path(recipe.data)
    manifest = export_checkpoint(
        lm.source, neurons, recipe.beta, output,
        base_model=recipe.model, served_model_name=recipe.name,
        dataset=DatasetInfo(
            source=recipe.data, format=recipe.data_format, n_examples=len(data.examples),
            sha256=sha256_file(data_path) if data_path.is_file() else None,
        ),
        attribution=recipe.attribution.model_dump(),
        prompt_template=TEMPLATES[data.examples[0].task], force=force,
    )
    return RecipeResult(output, store, neurons_file, manifest, data.skipped)
