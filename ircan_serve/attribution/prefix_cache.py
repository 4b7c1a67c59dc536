"""The prompt's KV cache, shared by every row of the fast path's passes and never modified.

Patching the last position cannot change earlier positions (causal attention), so every pass
continues the cache of all tokens but the last. These helpers cut that cache from the plain
pass's own, and give a pass views of it (expanded per row, not copied).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def has_tensor_layers(cache: Any) -> bool:
    """Whether ``cache`` keeps one key and one value tensor per layer (transformers'
    ``DynamicCache`` and its sliding-window layers), so that passes can share them as views."""
    layers = getattr(cache, "layers", None)
    return isinstance(layers, list) and all(
        isinstance(getattr(c, "keys", None), torch.Tensor) and isinstance(getattr(c, "values", None), torch.Tensor)
        for c in layers)


def without_last_token(cache: Any) -> Any:
    """``cache`` cut to all tokens but the last (views, no copy), or None where a layer keeps a
    sliding window: cutting one fails there once the prompt is as long as the window."""
    if not has_tensor_layers(cache) or any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        return None
    cache.crop(-1)
    return cache


def layer_copies(prefix: Any) -> Any:
    """A shallow copy of a :func:`has_tensor_layers` cache whose layers are shallow copies too,
    so that a pass can re-point or re-bind them without touching ``prefix``."""
    view = copy.copy(prefix)
    view.layers = [copy.copy(layer) for layer in prefix.layers]
    return view


def per_row_cache(prefix: Any, rows: int | Sequence[int]) -> Any:
    """A KV cache for ``rows`` copies of the prompt (one count for every layer, or one per
    layer), sharing ``prefix``'s tensors (expanded along the batch, not copied) so that running
    more tokens through it leaves ``prefix`` unchanged. A layer given 0 rows is left as it is:
    the fast path does not run it. Caches without tensor layers fall back to a deep copy with the
    largest count in every layer.
    """
    if not has_tensor_layers(prefix):
        cache = copy.deepcopy(prefix)
        most = rows if isinstance(rows, int) else max(rows)
        if most > 1:
            cache.batch_repeat_interleave(most)
        return cache
    per_layer = [rows] * len(prefix.layers) if isinstance(rows, int) else list(rows)
    view = layer_copies(prefix)
    for layer, n in zip(view.layers, per_layer):
        if n > 1:
            layer.keys = layer.keys.expand(n, *layer.keys.shape[1:])
            layer.values = layer.values.expand(n, *layer.values.shape[1:])
    return view


def prompt_prefix(model: PreTrainedModel, ids: torch.Tensor, cache: Any) -> Any:
    """The cache of all tokens of ``ids`` (1, T) but the last: the plain pass's ``cache`` cut by
    one token, or, for sliding-window caches (Mistral, Gemma 2/3), a pass of the decoder alone."""
    prefix = without_last_token(cache)
    if prefix is None:
        with torch.no_grad():
            prefix = model.base_model(ids[:, :-1], use_cache=True).past_key_values
    return prefix
