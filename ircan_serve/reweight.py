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


def scale_neurons(weight: torch.Tensor, indices: Sequence[int], beta: float, axis: int) -> torch.Tensor:
    """A copy of ``weight`` with the slices ``indices`` along ``axis`` multiplied by ``beta``.

    The product is taken in float32 and cast back, so export and in-memory reweighting agree.
    """
    out = weight.clone()
    idx = torch.as_tensor(list(indices), dtype=torch.long, device=weight.device)
    scaled = (weight.index_select(axis, idx).float() * beta).to(weight.dtype)
    return out.index_copy_(axis, idx, scaled)


def _targets(model: torch.nn.Module, neurons: NeuronSet | Mapping[int, Sequence[int]]):
    by_layer = neurons.by_layer() if isinstance(neurons, NeuronSet) else dict(neurons)
    axis = layout_for(model.config.model_type).neuron_axis
    projections = ffn_out_projections(model)
    for layer in by_layer:
        if not 0 <= layer < len(projections):
            raise ValueError(f"layer {layer} out of range (model has {len(projections)} layers)")
    return [(projections[layer].weight, idx, axis) for layer, idx in by_layer.items()]


def apply_reweighting(
    model: torch.nn.Module, neurons: NeuronSet | Mapping[int, Sequence[int]], beta: float
) -> None:
    """Scale the neurons' weights in place, permanently."""
    with torch.no_grad():
        for weight, idx, axis in _targets(model, neurons):
            weight.copy_(scale_neurons(weight, idx, beta, axis))


@contextmanager
def reweighted(
    model: torch.nn.Module, neurons: NeuronSet | Mapping[int, Sequence[int]], beta: float
) -> Iterator[torch.nn.Module]:
    """Scale the neurons' weights inside the block and restore the exact originals after it.

    Tuning loops over (h, beta) reuse one loaded model this way::

        with reweighted(model, neurons.top(4), beta=5.0):
            evaluate(model)
    """
    targets = _targets(model, neurons)
    saved = [weight.detach().clone() for weight, _, _ in targets]
    try:
        apply_reweighting(model, neurons, beta)
        yield model
    finally:
        with torch.no_grad():
            for (weight, _, _), original in zip(targets, saved):
                weight.copy_(original)
