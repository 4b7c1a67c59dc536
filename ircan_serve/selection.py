"""From per-example scores to the context-aware units and their factors (IRCAN, Section 3.2-3.3).

Per example: keep units scoring at least ``t * max``, then the ``z`` highest of those. Over all
examples: count how often each unit was kept; the ``h`` most frequent are the context-aware
units (ties broken by mean score).

Each unit also gets its *effect*, the sum over the attribution rows of a * mean gradient
(:meth:`~ircan_serve.attribution.result.Attribution.effect`): the first-order change of
P(context's answer) when its output weights are scaled up. Then :meth:`UnitSet.scaled` turns beta
into one factor per unit by a rule:

* ``paper``: every unit x beta, as in the paper;
* ``signed``: x beta where the effect is positive, x 1/beta where it is negative -- SwiGLU
  activations are signed, so a neuron with a high IRCAN score can push *away* from the
  context's answer when enhanced.

Export, verify and reweighting read the factor of each unit, never the rule.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .attribution.result import Attribution
from .config import SelectionConfig
from .errors import IrcanError
from .units import Unit, UnitSet

if TYPE_CHECKING:
    import torch


def example_top_units(scores: torch.Tensor, threshold: float, top_z: int) -> list[tuple[int, int, float]]:
    """(layer, index, score) of one example's kept units: score >= t*max, at most z.

    ``scores`` is (n_layers, units). An example whose best score is not positive keeps nothing.
    """
    flat = scores.flatten()  # (L * units,)
    best = flat.max().item()
    if best <= 0:
        return []
    keep = (flat >= threshold * best).nonzero().squeeze(1)  # (k,)
    values = flat[keep]
    order = values.argsort(descending=True)[:top_z]
    per_layer = scores.shape[1]
    return [(int(keep[i]) // per_layer, int(keep[i]) % per_layer, float(values[i])) for i in order]


def _six_digits(value: float) -> float:
    """6 significant digits: runs that differ only in float summation order (thread counts, Ray
    workers) write the same neurons.json."""
    return float(f"{float(value):.6g}")


def _select_kind(records: list[Attribution | torch.Tensor], config: SelectionConfig, keep: int) -> list[Unit]:
    """The ``keep`` units of one kind kept most often over its records (with their summed effects)."""
    counts: dict[tuple[int, int], int] = defaultdict(int)
    sums: dict[tuple[int, int], float] = defaultdict(float)
    effect_sum = None
    has_effects = True
    kind = "neuron"
    for record in records:
        if isinstance(record, Attribution):
            scores, kind = record.unit_scores(), record.kind
            if has_effects and record.activations_with is not None:
                e = record.unit_effects()
                effect_sum = e if effect_sum is None else effect_sum + e
            else:
                has_effects = False
        else:
            scores, has_effects = record, False
        for layer, index, value in example_top_units(scores, config.threshold, config.top_z):
            counts[(layer, index)] += 1
            sums[(layer, index)] += value
    ranked = sorted(counts, key=lambda k: (-counts[k], -sums[k] / counts[k], k))
    return [
        Unit(kind=kind, layer=k[0], index=k[1], count=counts[k], mean_score=_six_digits(sums[k] / counts[k]),
             effect=_six_digits(float(effect_sum[k])) if has_effects and effect_sum is not None else None)
        for k in ranked[:keep]
    ]


def select_units(
    records: Iterable[Attribution | torch.Tensor], config: SelectionConfig = SelectionConfig()
) -> UnitSet:
    """The ``h`` neurons (and ``g`` heads) kept most often over all examples.

    ``records`` are attribution results, of one or both unit kinds (effects are summed too, when
    they hold activations), or bare (n_layers, d_ff) score tensors of neurons (no effects). Each
    kind is counted apart: per example its units >= t * its max, its top z.
    """
    by_kind: dict[str, list[Attribution | torch.Tensor]] = defaultdict(list)
    for record in records:
        by_kind[record.kind if isinstance(record, Attribution) else "neuron"].append(record)
    if not by_kind:
        raise IrcanError("no attribution scores to select from")
    keep = {"neuron": config.num_neurons, "head": config.num_heads}
    units = [u for kind in ("neuron", "head") if kind in by_kind for u in _select_kind(by_kind[kind], config, keep[kind])]
    return UnitSet(neurons=units, selection=config, n_examples=max(len(v) for v in by_kind.values()))
