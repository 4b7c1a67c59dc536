"""Integrated gradients one layer at a time over the full sequence: the algorithm, plainly.

Kept for checking the fast path (``--method reference``): written to be read against the paper's
Eq. 3-4, with no caching, replay or batching across layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..generation import last_logits_kwargs
from .answer_probability import answer_prob, plain_output_head
from .hooks import patched_last_position
from .quadrature import Quadrature

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def reference_scores(
    model: PreTrainedModel,
    projections: Sequence[torch.nn.Module],
    input_ids: torch.Tensor,
    baseline: torch.Tensor,
    target: torch.Tensor,
    token: int,
    points: Quadrature,
    layers: Sequence[int],
) -> torch.Tensor:
    """Scores of every input feature of ``projections[l]`` for ``l`` in ``layers``.

    Args:
        input_ids: (1, T) prompt with context.
        baseline: (n_layers, features) activations a' without context.
        target: (n_layers, features) activations a with context.
        points: where the gradient is taken along the path, and the weights.
    Returns:
        (n_layers, features) ``(a - a') * sum_k w_k dP/da(a' + alpha_k (a - a'))``; layers not in
        ``layers`` stay 0.
    """
    alphas = points.alphas.to(input_ids.device, torch.float32)  # (m,)
    weights = points.weights.to(input_ids.device, torch.float32)  # (m,)
    scores = torch.zeros_like(target, dtype=torch.float32)
    batch = input_ids.expand(len(alphas), -1)  # (m, T)
    head = plain_output_head(model)
    for layer in layers:
        delta = target[layer] - baseline[layer]  # (features,)
        path = (baseline[layer] + alphas[:, None] * delta).requires_grad_()  # (m, features)
        with patched_last_position(projections, {layer: (slice(None), path)}):
            if head is not None:
                # the head on the (m, H) last hidden states: the model's own call on an (m, 1, H)
                # slice has a backward 10x less precise on CPU (2e-4 of the largest score on SmolLM2)
                hidden = model.base_model(batch, use_cache=False).last_hidden_state[:, -1]
                logits = head(hidden)[:, None, :]  # (m, 1, V)
            else:
                logits = model(batch, use_cache=False, **last_logits_kwargs(model)).logits
        probs = answer_prob(logits, token)  # (m,)
        (grads,) = torch.autograd.grad(probs.sum(), path)  # (m, features)
        scores[layer] = delta.float() * (weights[:, None] * grads.float()).sum(dim=0)  # float32 whatever the model dtype
    return scores
