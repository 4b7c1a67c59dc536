"""From per-example scores to the context-aware neurons (IRCAN, Section 3.2).

Per example: keep neurons scoring at least ``t * max``, then the ``z`` highest of those. Over all
examples: count how often each neuron was kept; the ``h`` most frequent are the context-aware
neurons (ties broken by mean score).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import SelectionConfig
from .errors import IrcanError

if TYPE_CHECKING:
    import torch


class Neuron(BaseModel):
    """One FFN neuron: the ``index``-th input of layer ``layer``'s output projection."""

    model_config = ConfigDict(frozen=True)
    layer: int = Field(ge=0)
    index: int = Field(ge=0)
    count: int = Field(0, ge=0, description="Examples whose top-z set held this neuron.")
    mean_score: float = Field(0.0, description="Mean score over those examples.")


class NeuronSet(BaseModel):
    """The selected neurons and how they were selected (``neurons.json``)."""

    neurons: list[Neuron]
    selection: SelectionConfig
    n_examples: int = Field(description="Examples the counts are taken over.")
    beta: float | None = Field(None, description="Chosen beta, once tuned or set.")

    def by_layer(self) -> dict[int, list[int]]:
        """layer -> sorted neuron indices."""
        out: dict[int, list[int]] = defaultdict(list)
        for n in self.neurons:
            out[n.layer].append(n.index)
        return {layer: sorted(idx) for layer, idx in sorted(out.items())}

    def top(self, h: int) -> "NeuronSet":
        """The first ``h`` neurons (they are sorted by frequency)."""
        return self.model_copy(update={"neurons": self.neurons[:h]})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "NeuronSet":
        path = Path(path)
        if not path.is_file():
            raise IrcanError(f"neuron file {path} does not exist; `ircan select` writes it")
        try:
            return cls.model_validate_json(path.read_text())
        except ValidationError as e:
            raise IrcanError(f"{path} is not a valid neurons file:\n{e}") from e


def example_top_neurons(scores: torch.Tensor, threshold: float, top_z: int) -> list[tuple[int, int, float]]:
    """(layer, index, score) of one example's kept neurons: score >= t*max, at most z.

    ``scores`` is (n_layers, d_ff). An example whose best score is not positive keeps nothing.
    """
    flat = scores.flatten()  # (L * d_ff,)
    best = flat.max().item()
    if best <= 0:
        return []
    keep = (flat >= threshold * best).nonzero().squeeze(1)  # (k,)
    values = flat[keep]
    order = values.argsort(descending=True)[:top_z]
    d_ff = scores.shape[1]
    return [(int(keep[i]) // d_ff, int(keep[i]) % d_ff, float(values[i])) for i in order]


def select_neurons(
    scores: Iterable[torch.Tensor], config: SelectionConfig = SelectionConfig()
) -> NeuronSet:
    """The ``h`` neurons kept most often over all examples' score tensors."""
    counts: dict[tuple[int, int], int] = defaultdict(int)
    sums: dict[tuple[int, int], float] = defaultdict(float)
    n = 0
    for s in scores:
        n += 1
        for layer, index, value in example_top_neurons(s, config.threshold, config.top_z):
            counts[(layer, index)] += 1
            sums[(layer, index)] += value
    if n == 0:
        raise IrcanError("no attribution scores to select from")
    ranked = sorted(counts, key=lambda k: (-counts[k], -sums[k] / counts[k], k))
    neurons = [
        Neuron(layer=k[0], index=k[1], count=counts[k], mean_score=sums[k] / counts[k])
        for k in ranked[: config.num_neurons]
    ]
    return NeuronSet(neurons=neurons, selection=config, n_examples=n)


