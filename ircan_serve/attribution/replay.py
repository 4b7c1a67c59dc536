"""Decoder layers that compute only the rows that can differ, and replay the rest.

In a fast pass, row 0 and the rows patching a layer below ``k`` may differ from the plain pass
at layer ``k``; the rows patching a layer above ``k`` cannot (causal layers: nothing has changed
for them yet). :func:`replayed_layers` makes each layer compute only the first rows and hand the
others the output it recorded in the plain pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .hooks import hidden_of, map_hidden


def first_rows(value: Any, rows: int, n: int) -> Any:
    """``value`` (a layer's argument) cut to its first ``n`` of ``rows`` batch rows."""
    if isinstance(value, torch.Tensor):
        return value[:n] if value.dim() > 0 and value.shape[0] == rows else value
    if isinstance(value, (tuple, list)):
        return type(value)(first_rows(v, rows, n) for v in value)
    return value


def _limited_forward(run: Any, recorded_output: Any, rows: int, computed: int, own: torch.Tensor | None) -> Any:
    """A layer forward that runs ``run`` on the first ``computed`` rows only; the next ``len(own)``
    rows get the recorded output plus ``own``, the others the recorded output."""
    recorded = hidden_of(recorded_output)  # (1, 1, H)
    n_own = 0 if own is None else len(own)
    parts = [recorded.expand(rows - computed - n_own, *recorded.shape[1:])]
    if own is not None:  # the rows that patch this layer: recorded + their projection's change
        parts.insert(0, recorded.to(own.dtype) + own[:, None, :])

    def forward(*args: Any, **kwargs: Any) -> Any:
        if computed == 0:
            return map_hidden(recorded_output, lambda _h: torch.cat(parts, dim=0) if len(parts) > 1 else parts[0])
        result = run(*(first_rows(a, rows, computed) for a in args),
                     **{key: first_rows(v, rows, computed) for key, v in kwargs.items()})
        return map_hidden(result, lambda h: torch.cat([h, *(p.to(h.dtype) for p in parts)], dim=0))

    return forward


@contextmanager
def replayed_layers(layers: Sequence[torch.nn.Module], outputs: Sequence[Any], active: Sequence[int],
                    rows: int, own: dict[int, torch.Tensor] | None = None) -> Iterator[None]:
    """Make layer ``k`` compute only its first ``active[k]`` rows; the other rows take the
    layer's recorded last-position output (``outputs[k]``), plus ``own[k]`` for the rows right
    after the computed ones, if given.

    Rows are ordered by the layer they patch, so at layer ``k`` the rows that patch a layer above
    ``k`` come last, and for them nothing has changed yet. ``own[k]`` ((n, H)) is how much the
    rows that patch layer ``k`` change its output, where that is known without running the layer.
    A layer with no row to compute is not run.
    """
    own = own or {}
    saved: list[tuple[torch.nn.Module, Any]] = []
    try:
        for k, (layer, out, n) in enumerate(zip(layers, outputs, active)):
            if n >= rows:
                continue
            saved.append((layer, layer.__dict__.get("forward")))  # an accelerate hook may live there
            layer.forward = _limited_forward(layer.forward, out, rows, n, own.get(k))
        yield
    finally:
        for layer, previous in saved:
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous
