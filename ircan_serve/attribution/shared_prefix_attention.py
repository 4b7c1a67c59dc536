"""Attention of many one-token rows over one prompt prefix they all share.

Every row of a fast attribution pass continues the same prompt, so the prefix's keys and values
are kept once, never copied per row. :func:`shared_prefix_attention` has the signature of
transformers' attention functions (``eager_attention_forward`` in ``modeling_llama.py``) and is
registered with them under :data:`SHARED_PREFIX_ATTENTION`; :func:`shared_prefix_pass` switches a
model to it for one pass and hands it the prefix.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch

from .prefix_cache import has_tensor_layers, layer_copies

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SHARED_PREFIX_ATTENTION = "ircan_shared_prefix"
"""The name :func:`shared_prefix_attention` is registered under with transformers' attention
functions; :func:`shared_prefix_pass` switches the model's attention implementation to it."""

_pass_prefix: ContextVar[tuple[Any, list[int]] | None] = ContextVar("ircan_shared_prefix", default=None)
"""During a :func:`shared_prefix_pass`: the prefix cache, and the layers whose attention ran."""


def shared_prefix_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
                            **_kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of each row's one new token over a prompt prefix that all rows share.

    The prefix's keys and values are kept once, (1, Hkv, P, d): one product per key head scores
    every row's query heads against the prefix, and each row adds its own token, whose key and
    value (``key``, ``value``: (B, Hkv, 1, d)) the pass-through cache hands over unstored. Without
    per-row copies and per-row kernel calls this is faster than scaled-dot-product attention, and
    a long prompt does not bound the rows of a pass. Returns (B, 1, Hq, d), as transformers'
    attention functions do.
    """
    state = _pass_prefix.get()
    if state is None:
        raise RuntimeError("shared_prefix_attention runs only inside shared_prefix_pass")
    prefix, ran = state
    layer: int = module.layer_idx  # type: ignore[assignment]  # nn.Module attributes are typed tensor-or-module
    ran.append(layer)
    cached = prefix.layers[layer]
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    q = query.reshape(rows, kv_heads, group, dim)  # query head j*group + i reads key head j
    by_head = q.transpose(0, 1).reshape(kv_heads, rows * group, dim)
    on_prefix = torch.bmm(by_head, cached.keys[0].transpose(1, 2))  # (Hkv, B*group, P)
    on_own = (q * key).sum(-1).transpose(0, 1).reshape(kv_heads, rows * group, 1)
    scores = torch.cat([on_prefix, on_own], dim=-1).float() * scale
    weights = (scores - scores.amax(dim=-1, keepdim=True).detach()).exp()
    weights = (weights / weights.sum(dim=-1, keepdim=True)).to(query.dtype)  # (Hkv, B*group, P + 1)
    own_values = value.transpose(0, 1).expand(kv_heads, rows, group, dim).reshape(kv_heads, rows * group, dim)
    on_prefix_w, on_own_w = weights.split([weights.shape[-1] - 1, 1], dim=-1)  # one backward cat, no zero fills
    out = torch.bmm(on_prefix_w, cached.values[0]) + on_own_w * own_values
    return out.reshape(kv_heads, rows, group, dim).transpose(0, 1).reshape(rows, 1, heads, dim), None


def _register() -> None:
    """Make :data:`SHARED_PREFIX_ATTENTION` an attention implementation transformers can select
    (its mask function makes no mask: the last token sees the whole prefix)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)
    AttentionMaskInterface.register(SHARED_PREFIX_ATTENTION, lambda *_args, **_kwargs: None)


def shares_prefix(model: PreTrainedModel, prefix: Any) -> bool:
    """Whether passes over ``prefix`` can use :func:`shared_prefix_attention`: a cache with one
    key and value tensor per layer, and no attention soft-capping (Gemma 2) or GPT-2's reordered
    attention, which compute otherwise. Sliding-window layers qualify: their cache keeps exactly
    the window's earlier tokens, which is what the new token attends to."""
    config = model.config
    return (has_tensor_layers(prefix) and not getattr(config, "attn_logit_softcapping", None)
            and not getattr(config, "reorder_and_upcast_attn", False))


def _pass_through(key_states: torch.Tensor, value_states: torch.Tensor, *_args: Any, **_kwargs: Any
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    return key_states, value_states


@contextmanager
def shared_prefix_pass(model: PreTrainedModel, prefix: Any) -> Iterator[tuple[Any, list[int]]]:
    """Run the model's attention as :func:`shared_prefix_attention` over ``prefix``.

    Yields a cache for the pass (``prefix``'s layers, whose ``update`` hands the new token's key
    and value through without storing them) and the list of layers whose attention ran: a layer
    whose attention bypasses transformers' attention functions does not appear in it.
    """
    view = layer_copies(prefix)
    for layer in view.layers:
        layer.update = _pass_through
    _register()
    ran: list[int] = []
    token = _pass_prefix.set((prefix, ran))
    config = model.config
    saved = config._attn_implementation
    config._attn_implementation = SHARED_PREFIX_ATTENTION
    try:
        yield view, ran
    finally:
        config._attn_implementation = saved
        _pass_prefix.reset(token)
