"""Scale the selected neurons' output-projection weights by beta (IRCAN, Section 3.3).

Neuron ``i`` of layer ``l`` writes to the residual stream through the ``i``-th input slice of
the FFN output projection (a column of ``nn.Linear.weight``, a row of GPT-2's ``Conv1D``).
Multiplying that slice by beta scales the neuron's contribution; beta = 0 erases it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from .architectures import ffn_out_projections, layout_for
from .selection import NeuronSet


def scale_neurons(weight: torch.Tensor, indices: Sequence[int], beta: float | Sequence[float],
                  axis: int) -> torch.Tensor:
    """A copy of ``weight`` with the slices ``indices`` along ``axis`` multiplied by ``beta``
    (one factor for all, or one per index).

    The product is taken in float32 and cast back, so export and in-memory reweighting agree.
    """
    out = weight.clone()
    idx = torch.as_tensor(list(indices), dtype=torch.long, device=weight.device)
    factors = torch.as_tensor(beta, dtype=torch.float32, device=weight.device)
    if factors.dim() == 1:  # (k,) -> broadcast along the neuron axis
        factors = factors.view([-1 if d == axis else 1 for d in range(weight.dim())])
    scaled = (weight.index_select(axis, idx).float() * factors).to(weight.dtype)
    return out.index_copy_(axis, idx, scaled)


Neurons = NeuronSet | Mapping[int, Sequence[int]]


def neuron_factors(neurons: Neurons, beta: float | None = None) -> dict[int, tuple[list[int], list[float]]]:
    """layer -> (indices, factors): ``beta`` for every neuron when given, else each neuron's scale."""
    if not isinstance(neurons, NeuronSet):
        if beta is None:
            raise ValueError("a plain layer -> indices mapping needs a beta")
        return {layer: (list(idx), [beta] * len(idx)) for layer, idx in dict(neurons).items()}
    factors = [beta] * len(neurons.neurons) if beta is not None else neurons.scales()
    out: dict[int, tuple[list[int], list[float]]] = {}
    for n, f in sorted(zip(neurons.neurons, factors), key=lambda p: (p[0].layer, p[0].index)):
        idx, fs = out.setdefault(n.layer, ([], []))
        idx.append(n.index)
        fs.append(float(f))  # type: ignore[arg-type]
    return out


def _targets(model: torch.nn.Module, neurons: Neurons, beta: float | None):
    by_layer = neuron_factors(neurons, beta)
    axis = layout_for(model.config.model_type).neuron_axis
    projections = ffn_out_projections(model)
    for layer in by_layer:
        if not 0 <= layer < len(projections):
            raise ValueError(f"layer {layer} out of range (model has {len(projections)} layers)")
    return [(projections[layer].weight, idx, f, axis) for layer, (idx, f) in by_layer.items()]


def apply_reweighting(model: torch.nn.Module, neurons: Neurons, beta: float | None = None) -> None:
    """Scale the neurons' weights in place, permanently: by ``beta``, or by each neuron's scale."""
    with torch.no_grad():
        for weight, idx, factors, axis in _targets(model, neurons, beta):
            weight.copy_(scale_neurons(weight, idx, factors, axis))


@contextmanager
def reweighted(model: torch.nn.Module, neurons: Neurons, beta: float | None = None) -> Iterator[torch.nn.Module]:
    """Scale the neurons' weights inside the block and restore the exact originals after it.

    ``beta`` scales every neuron alike; without it each neuron's own scale is used (a set from
    :meth:`NeuronSet.scaled`). Tuning loops over (rule, h, beta) reuse one loaded model::

        with reweighted(model, neurons.top(4).scaled(5.0, "signed")):
            evaluate(model)
    """
    targets = _targets(model, neurons, beta)
    saved = [weight.detach().clone() for weight, _, _, _ in targets]
    try:
        apply_reweighting(model, neurons, beta)
        yield model
    finally:
        with torch.no_grad():
            for (weight, _, _, _), original in zip(targets, saved):
                weight.copy_(original)
