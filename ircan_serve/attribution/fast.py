"""The fast path: every integration point of several layers in one pass that reruns one token.

Patching the last position cannot change earlier positions (causal attention), so the prefix's
KV cache is computed once and only the last token is recomputed, with the points of several
layers stacked into one batch and one backward pass. Patching layer ``l`` cannot change layers
below ``l`` either, so those layers are not run: they return the hidden state recorded in the
plain pass (:mod:`.replay`), and a row's work starts at its own layer (at its output projection,
where the FFN output joins the residual as it is). A quadrature point at alpha = 1 changes
nothing, so one unpatched row stands for it in every layer. All rows share the prompt's cache
through :func:`~.shared_prefix_attention.shared_prefix_attention`, and P(answer) comes from the
last hidden state through :class:`~.answer_probability.AnswerProbabilityHead`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..architectures import decoder_layers, weight_of
from ..generation import last_logits_kwargs
from .answer_probability import AnswerProbabilityHead, answer_prob, plain_output_head
from .hooks import Patch, patched_last_position
from .prefix_cache import has_tensor_layers, per_row_cache
from .quadrature import Quadrature
from .replay import replayed_layers
from .shared_prefix_attention import shared_prefix_pass, shares_prefix

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

PASS_MEMORY_BYTES = 2 * 1024**3
"""What the default pass size aims to fit: the rows' attention buffers and vocabulary-sized buffers."""

FALLBACK_ROWS = 120
"""Rows per pass where the cache's size cannot be read (caches without tensor layers)."""


def rows_per_pass(model: PreTrainedModel, prefix: Any, *, shared: bool = False) -> int:
    """Rows that fit :data:`PASS_MEMORY_BYTES` in one fast pass over ``prefix``.

    Each row holds, in every layer it runs, either its attention weights over the prompt
    (``shared``: the shared-prefix attention) or its own copy of the prompt's keys and values
    (the attention concatenates the new token to the cache), and vocabulary-sized buffers: one
    float32 column of :class:`AnswerProbabilityHead`'s logits (plus the model-dtype product when
    that is not float32), or three float32 rows (logits, softmax, their gradient) where the model's
    own head runs. Short prompts fit every layer's rows in one pass, which keeps the matrix
    products large.
    """
    if not has_tensor_layers(prefix):
        return FALLBACK_ROWS
    if shared:
        heads = getattr(model.config, "num_attention_heads", 1)
        attention = sum(2 * heads * (c.keys.shape[-2] + 1) * 4 for c in prefix.layers)  # scores, weights
    else:
        attention = sum(2 * c.keys[0].numel() * c.keys.element_size() for c in prefix.layers)
    weight = model.get_output_embeddings().weight
    if plain_output_head(model) is None:
        per_vocab = 3 * 4
    else:
        per_vocab = 4 + (weight.element_size() if weight.dtype != torch.float32 else 0)
    return max(1, int(PASS_MEMORY_BYTES // (attention + per_vocab * weight.shape[0])))


def _chunks(layers: Sequence[int], per_pass: int) -> list[list[int]]:
    """Sorted layers in passes of at most ``per_pass`` layers."""
    ordered = sorted(layers)
    return [ordered[i : i + per_pass] for i in range(0, len(ordered), per_pass)]


@dataclass
class _PassRows:
    """The rows of one pass: row 0 unpatched, then ``steps`` rows per layer of ``chunk``."""

    chunk: list[int]
    rows: int
    active: list[int]
    """Rows each decoder layer computes (the others replay the plain pass)."""
    deltas: torch.Tensor
    """(g, features) a - a' of each chunk layer."""
    points: torch.Tensor
    """(g, steps, features) the patched integration points, a leaf of the backward."""
    probes: torch.Tensor
    """(g, features) zeros added to row 0 at each chunk layer, a leaf: their gradient is the
    derivative at alpha = 1."""
    patches: dict[int, Patch] = field(default_factory=dict)
    probe_of: dict[int, torch.Tensor] = field(default_factory=dict)
    own: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per chunk layer, how much each patching row changes the layer's output (skip-own rows)."""


def _active_rows(chunk: list[int], n_layers: int, steps: int, replay: bool, skip_own: bool, tensors: bool) -> list[int]:
    """Rows layer ``k`` computes: row 0 and the rows of chunk layers <= k (< k when they skip their
    own layer), none below the chunk's lowest layer; every row without recorded outputs."""
    rows = 1 + len(chunk) * steps
    if not replay:
        return [rows] * n_layers
    active = [1 + steps * sum(1 for c in chunk if (c < k if skip_own else c <= k)) if k >= chunk[0] else 0
              for k in range(n_layers)]
    return active if tensors else [rows if n else 0 for n in active]  # a copied cache holds every row


def _pass_rows(chunk: list[int], baseline: torch.Tensor, target: torch.Tensor, alphas: torch.Tensor,
               projections: Sequence[torch.nn.Module], active: list[int], skip_own: bool) -> _PassRows:
    steps = len(alphas)
    deltas = target[chunk] - baseline[chunk]  # (g, features)
    points = (baseline[chunk][:, None, :] + alphas[None, :, None] * deltas[:, None, :]).requires_grad_()
    probes = torch.zeros_like(deltas, dtype=torch.float32).requires_grad_()  # (g, features)
    # unbound once: indexing points[g] per layer would fill a zero (g, steps, features) gradient per layer
    per_layer = points.unbind(0)
    out = _PassRows(chunk, 1 + len(chunk) * steps, active, deltas, points, probes,
                    probe_of=dict(zip(chunk, probes.unbind(0))))
    if skip_own:  # each patching row's change of its layer's output: proj(point) - proj(a)
        dtype = weight_of(projections[chunk[0]]).dtype
        out.own = {layer: projections[layer](per_layer[g].to(dtype)) - projections[layer](target[layer][None].to(dtype))
                   for g, layer in enumerate(chunk)}
    else:
        out.patches = {layer: (slice(1 + g * steps, 1 + (g + 1) * steps), per_layer[g]) for g, layer in enumerate(chunk)}
    return out


def _answer_probs(model: PreTrainedModel, projections: Sequence[torch.nn.Module], prefix: Any, rows: _PassRows,
                  layer_outputs: Sequence[Any] | None, last: torch.Tensor, token: int,
                  shared: bool) -> tuple[torch.Tensor, list[int]]:
    """(rows,) P(answer) of one pass, and the layers whose shared-prefix attention ran."""
    blocks = decoder_layers(model)
    head = plain_output_head(model)
    replay = replayed_layers(blocks, layer_outputs or [None] * len(blocks), rows.active, rows.rows, rows.own)
    attention: AbstractContextManager[tuple[Any, list[int]]] = (
        shared_prefix_pass(model, prefix) if shared else nullcontext((per_row_cache(prefix, rows.active), [])))
    with patched_last_position(projections, rows.patches, rows.probe_of), replay, attention as (cache, ran):
        tokens = last.expand(rows.rows, 1)
        if head is not None:  # the decoder, then P(answer) straight from its last hidden state
            hidden = model.base_model(tokens, past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
            probs = AnswerProbabilityHead.apply(hidden, head.weight, head.bias, token)
        else:
            logits = model(tokens, past_key_values=cache, use_cache=True, **last_logits_kwargs(model)).logits
            probs = answer_prob(logits, token)
    return probs, ran


def fast_scores(
    model: PreTrainedModel,
    projections: Sequence[torch.nn.Module],
    input_ids: torch.Tensor,
    prefix: Any,
    baseline: torch.Tensor,
    target: torch.Tensor,
    token: int,
    points: Quadrature,
    layers: Sequence[int],
    internal_batch_size: int | None = None,
    layer_outputs: Sequence[Any] | None = None,
    skip_own_layer: bool = False,
) -> torch.Tensor:
    """The same scores as :func:`~.reference.reference_scores`, from ``prefix``, the KV cache of
    all tokens but the last (it is read, never modified).

    Each pass recomputes only the last token, for the layers of one chunk. Row 0 is unpatched and
    stands for a point at alpha = 1 in every chunk layer (its gradient there is read through a
    zero probe); rows ``1 + [g*s, (g+1)*s)`` patch layer ``chunk[g]`` with the other ``s`` points.
    Rows are independent, so one backward pass yields every layer's gradients. With
    ``layer_outputs`` (each decoder layer's last-position output in the plain pass), layer ``k``
    computes only row 0 and the rows that patch a layer ``< k`` (``<= k`` unless
    ``skip_own_layer``: then the rows that patch layer ``k`` get its recorded output plus their
    projection's change, which holds where that output joins the residual as it is).
    ``internal_batch_size`` bounds the rows of a pass (default: :func:`rows_per_pass`).
    """
    inner = points.alphas[:-1] if points.ends_at_target else points.alphas
    weights = points.weights.to(input_ids.device, torch.float32)
    end_weight = weights[-1] if points.ends_at_target else None
    inner_weights = weights[: len(inner)]  # (s,)
    alphas = inner.to(input_ids.device, torch.float32)
    shared = shares_prefix(model, prefix)
    per_pass = max(1, (internal_batch_size or rows_per_pass(model, prefix, shared=shared)) // len(points.alphas))
    tensors = has_tensor_layers(prefix)
    skip_own = skip_own_layer and layer_outputs is not None and tensors  # a copied cache needs every row
    n_layers = len(decoder_layers(model))
    last = input_ids[:, -1:]  # (1, 1)
    scores = torch.zeros_like(target, dtype=torch.float32)
    for chunk in _chunks(layers, per_pass):
        active = _active_rows(chunk, n_layers, len(alphas), layer_outputs is not None, skip_own, tensors)
        rows = _pass_rows(chunk, baseline, target, alphas, projections, active, skip_own)
        probs, ran = _answer_probs(model, projections, prefix, rows, layer_outputs, last, token, shared)
        if shared and sorted(ran) != [k for k, n in enumerate(active) if n]:
            # an attention that does not go through transformers' attention functions saw only the
            # new token: redo the pass, and run the next ones, with per-row copies of the prefix
            log.warning("%s attention bypasses the shared-prefix attention; using per-row caches",
                        model.config.model_type)
            shared = False
            probs, _ = _answer_probs(model, projections, prefix, rows, layer_outputs, last, token, shared)
        on_points, at_target = torch.autograd.grad(probs.sum(), (rows.points, rows.probes), allow_unused=True)
        total = torch.zeros_like(rows.deltas, dtype=torch.float32)  # (g, features)
        if end_weight is not None and at_target is not None:
            total += end_weight * at_target.float()
        if on_points is not None:
            total += (inner_weights[None, :, None] * on_points.float()).sum(dim=1)
        scores[chunk] = rows.deltas.float() * total  # float32 whatever the model dtype
    return scores
