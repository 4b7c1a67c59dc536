"""From per-example scores to the context-aware neurons and their factors (IRCAN, Section 3.2-3.3).

Per example: keep neurons scoring at least ``t * max``, then the ``z`` highest of those. Over all
examples: count how often each neuron was kept; the ``h`` most frequent are the context-aware
neurons (ties broken by mean score).

Each neuron also gets its *effect*, the sum over the attribution rows of a * mean gradient
(:meth:`~ircan_serve.attribution.Attribution.effect`): the first-order change of P(context's
answer) when its output column is scaled up. Then :meth:`NeuronSet.scaled` turns beta into one
factor per neuron by a rule:

* ``paper``: every neuron x beta, as in the paper;
* ``signed``: x beta where the effect is positive, x 1/beta where it is negative -- SwiGLU
  activations are signed, so a neuron with a high IRCAN score can push *away* from the
  context's answer when enhanced.

Export, verify and reweighting read the factor of each neuron, never the rule.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import Rule, SelectionConfig
from .errors import IrcanError

if TYPE_CHECKING:
    import torch

    from .attribution import Attribution


class Neuron(BaseModel):
    """One FFN neuron: the ``index``-th input of layer ``layer``'s output projection."""

    model_config = ConfigDict(frozen=True)
    layer: int = Field(ge=0)
    index: int = Field(ge=0)
    count: int = Field(0, ge=0, description="Examples whose top-z set held this neuron.")
    mean_score: float = Field(0.0, description="Mean score over those examples.")
    effect: float | None = Field(None, description="Sum over the attribution rows of a * mean "
                                 "gradient: > 0 means scaling the neuron up raises P(context's answer).")
    scale: float | None = Field(None, description="The factor on this neuron's output column "
                                "(set by NeuronSet.scaled; None: the set's beta).")


class NeuronSet(BaseModel):
    """The selected neurons and how they were selected (``neurons.json``)."""

    neurons: list[Neuron]
    selection: SelectionConfig
    n_examples: int = Field(description="Examples the counts are taken over.")
    beta: float | None = Field(None, description="Chosen beta, once tuned or set.")
    rule: Rule | None = Field(None, description="How beta became the neurons' scales, once set.")

    def scaled(self, beta: float, rule: Rule = "paper") -> "NeuronSet":
        """A copy whose neurons carry their factor: ``beta`` for all (``paper``), or ``beta`` /
        ``1/beta`` by the sign of each neuron's effect (``signed``)."""
        if beta < 0:
            raise IrcanError(f"beta must be >= 0, got {beta}")
        if rule == "signed":
            if beta == 0:
                raise IrcanError("the signed rule needs beta > 0 (1/beta goes on the neurons that push "
                                 "away); erasing is the paper rule with beta = 0")
            missing = [f"{n.layer}:{n.index}" for n in self.neurons if n.effect is None]
            if missing:
                raise IrcanError(f"neurons {', '.join(missing)} have no effect recorded: the signed rule "
                                 "needs an attribution store of version 2 (rerun `ircan attribute`)")
        neurons = [n.model_copy(update={"scale": beta if rule == "paper" or (n.effect or 0) > 0 else 1 / beta})
                   for n in self.neurons]
        return self.model_copy(update={"neurons": neurons, "beta": beta, "rule": rule})

    def scales(self) -> list[float]:
        """The factor of each neuron (its ``scale``, else the set's ``beta``)."""
        out = []
        for n in self.neurons:
            factor = n.scale if n.scale is not None else self.beta
            if factor is None:
                raise IrcanError(f"neuron {n.layer}:{n.index} has no scale and the set no beta")
            out.append(float(factor))
        return out

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


def _summary(value: float) -> float:
    """6 significant digits: runs that differ only in float summation order (thread counts, Ray
    workers) write the same neurons.json."""
    return float(f"{float(value):.6g}")


def select_neurons(
    records: Iterable[Attribution | torch.Tensor], config: SelectionConfig = SelectionConfig()
) -> NeuronSet:
    """The ``h`` neurons kept most often over all examples.

    ``records`` are attribution results (their effects are summed too, when they hold
    activations) or bare (n_layers, d_ff) score tensors (no effects).
    """
    counts: dict[tuple[int, int], int] = defaultdict(int)
    sums: dict[tuple[int, int], float] = defaultdict(float)
    effect_sum = None
    has_effects = True
    n = 0
    for record in records:
        n += 1
        s = getattr(record, "scores", record)
        if has_effects and getattr(record, "activations_with", None) is not None:
            e = record.effect()  # type: ignore[union-attr]
            effect_sum = e if effect_sum is None else effect_sum + e
        else:
            has_effects = False
        for layer, index, value in example_top_neurons(s, config.threshold, config.top_z):
            counts[(layer, index)] += 1
            sums[(layer, index)] += value
    if n == 0:
        raise IrcanError("no attribution scores to select from")
    ranked = sorted(counts, key=lambda k: (-counts[k], -sums[k] / counts[k], k))
    neurons = [
        Neuron(layer=k[0], index=k[1], count=counts[k], mean_score=_summary(sums[k] / counts[k]),
               effect=_summary(float(effect_sum[k])) if has_effects and effect_sum is not None else None)
        for k in ranked[: config.num_neurons]
    ]
    return NeuronSet(neurons=neurons, selection=config, n_examples=n)


