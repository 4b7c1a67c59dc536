"""Scale the selected units' output weights by their factors (IRCAN, Section 3.3).

A unit writes to the residual stream through its input slice of an output projection: one column
of the FFN output projection for a neuron (a row of GPT-2's ``Conv1D``), ``head_dim`` columns of
the attention output projection for a head. Multiplying that slice by beta scales the unit's
contribution; beta = 0 erases it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from .architectures import weight_of
from .units import UnitSet, feature_indices, projections, unit_width, weight_axis

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Units = UnitSet | Mapping[int, Sequence[int]]
"""A unit set (each unit with its factor), or a plain layer -> neuron indices mapping."""


def scale_slices(weight: torch.Tensor, indices: Sequence[int], factors: float | Sequence[float],
                 axis: int) -> torch.Tensor:
    """A copy of ``weight`` with the slices ``indices`` along ``axis`` multiplied by ``factors``
    (one factor for all, or one per index).

    The product is taken in float32 and cast back, so export and in-memory reweighting agree.
    """
    out = weight.clone()
    idx = torch.as_tensor(list(indices), dtype=torch.long, device=weight.device)
    scale = torch.as_tensor(factors, dtype=torch.float32, device=weight.device)
    if scale.dim() == 1:  # (k,) -> broadcast along the slice axis
        scale = scale.view([-1 if d == axis else 1 for d in range(weight.dim())])
    scaled = (weight.index_select(axis, idx).float() * scale).to(weight.dtype)
    return out.index_copy_(axis, idx, scaled)


def slice_factors(units: Units, widths: Mapping[str, int], beta: float | None = None
                  ) -> dict[tuple[str, int], tuple[list[int], list[float]]]:
    """(kind, layer) -> (weight slice indices, factors): every input feature of every unit, with
    ``beta`` when given, else its unit's scale. ``widths`` gives each kind's features per unit."""
    if not isinstance(units, UnitSet):
        if beta is None:
            raise ValueError("a plain layer -> indices mapping needs a beta")
        return {("neuron", layer): (list(idx), [beta] * len(idx)) for layer, idx in dict(units).items()}
    factors = [beta] * len(units.neurons) if beta is not None else units.scales()
    out: dict[tuple[str, int], tuple[list[int], list[float]]] = {}
    for u, f in sorted(zip(units.neurons, factors), key=lambda p: (p[0].kind, p[0].layer, p[0].index)):
        idx, fs = out.setdefault((u.kind, u.layer), ([], []))
        features = feature_indices(u.index, widths[u.kind])
        idx.extend(features)
        fs.extend([float(f)] * len(features))
    return out


def _targets(model: PreTrainedModel, units: Units, beta: float | None
             ) -> list[tuple[torch.Tensor, list[int], list[float], int]]:
    kinds = {u.kind for u in units.neurons} if isinstance(units, UnitSet) else {"neuron"}
    widths: dict[str, int] = {kind: unit_width(model.config, kind) for kind in kinds}
    model_type = model.config.model_type
    targets = []
    for (kind, layer), (idx, factors) in slice_factors(units, widths, beta).items():
        layers = projections(model, kind)
        if not 0 <= layer < len(layers):
            raise ValueError(f"layer {layer} out of range (model has {len(layers)} layers)")
        targets.append((weight_of(layers[layer]), idx, factors, weight_axis(model_type, kind)))
    return targets


def apply_reweighting(model: PreTrainedModel, units: Units, beta: float | None = None) -> None:
    """Scale the units' weights in place, permanently: by ``beta``, or by each unit's scale."""
    with torch.no_grad():
        for weight, idx, factors, axis in _targets(model, units, beta):
            weight.copy_(scale_slices(weight, idx, factors, axis))


@contextmanager
def reweighted(model: PreTrainedModel, units: Units, beta: float | None = None) -> Iterator[torch.nn.Module]:
    """Scale the units' weights inside the block and restore the exact originals after it.

    ``beta`` scales every unit alike; without it each unit's own scale is used (a set from
    :meth:`UnitSet.scaled`). Tuning loops over (rule, h, beta) reuse one loaded model::

        with reweighted(model, units.top(4).scaled(5.0, "signed")):
            evaluate(model)
    """
    targets = _targets(model, units, beta)
    saved = [weight.detach().clone() for weight, _, _, _ in targets]
    try:
        apply_reweighting(model, units, beta)
        yield model
    finally:
        with torch.no_grad():
            for (weight, _, _, _), original in zip(targets, saved):
                weight.copy_(original)
