"""Forward hooks at the last prompt position: read a projection's input, or replace it.

Attribution reads the input of each layer's unit projection (the FFN output projection for
neurons, the attention output projection for heads) at the last position in one plain pass, and
replaces it there with integration points in the gradient passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..architectures import decoder_layers
from ..generation import last_logits_kwargs
from .answer_probability import answer_prob

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Patch = tuple[slice | None, torch.Tensor | None]
"""(rows, values): the batch rows whose last-position input is replaced, and their values."""


@contextmanager
def patched_last_position(
    projections: Sequence[torch.nn.Module], patches: dict[int, Patch],
    probes: dict[int, torch.Tensor] | None = None,
) -> Iterator[None]:
    """Replace, for ``rows``, the last-position input of layer ``l``'s projection by ``values``.

    ``patches`` maps layer -> (rows, values) with values of shape (len(rows), features). ``probes``
    maps layer -> a (features,) zero tensor added to row 0's last-position input there: it changes
    nothing, and its gradient is the derivative with respect to that input, through every path.
    """

    def make_hook(rows: slice | None, values: torch.Tensor | None, probe: torch.Tensor | None
                  ) -> Callable[..., tuple[Any, ...]]:
        def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0].clone()  # (B, T, features)
            if values is not None:
                x[rows, -1, :] = values.to(device=x.device, dtype=x.dtype)  # float32 points, into the model's dtype
            if probe is not None:
                x[0, -1, :] = x[0, -1, :] + probe.to(device=x.device, dtype=x.dtype)
            return (x, *args[1:])

        return hook

    probes = probes or {}
    handles = [
        projections[layer].register_forward_pre_hook(make_hook(*patches.get(layer, (None, None)), probes.get(layer)))
        for layer in sorted(set(patches) | set(probes))
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def map_hidden(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to the hidden states of a decoder layer's output (a tensor, or a tuple whose
    first item is the hidden states, depending on the family and transformers version)."""
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden states of a decoder layer's output."""
    hidden: torch.Tensor = output[0] if isinstance(output, tuple) else output
    return hidden


@dataclass
class PlainPass:
    """What one plain forward pass tells about the last position."""

    activations: torch.Tensor
    """(n_layers, features) float32 projection inputs at the last position."""
    prob: float
    """P(answer token) at the last position."""
    layer_outputs: list[Any] | None = None
    """Each decoder layer's output at the last position, when recorded."""
    cache: Any = None
    """The prompt's KV cache, when kept."""


@torch.no_grad()
def plain_pass(model: PreTrainedModel, projections: Sequence[torch.nn.Module], input_ids: torch.Tensor,
               token: int, *, record_layers: bool = False, keep_cache: bool = False) -> PlainPass:
    """Run the prompt once; read every layer's projection input and P(token) at the last position.

    ``record_layers`` keeps each decoder layer's last-position output, which the fast path replays
    instead of running the layers below a patched one; ``keep_cache`` the prompt's KV cache.
    """
    captured: list[torch.Tensor | None] = [None] * len(projections)
    outputs: list[Any] = [None] * len(projections)

    def make_reader(layer: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            # float32 whatever the model dtype, on one device even when layers are spread out
            captured[layer] = args[0][0, -1].detach().to(device=input_ids.device, dtype=torch.float32)

        return hook

    def make_recorder(layer: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            outputs[layer] = map_hidden(output, lambda h: h[:, -1:].detach())

        return hook

    handles = [p.register_forward_pre_hook(make_reader(i)) for i, p in enumerate(projections)]
    if record_layers:
        handles += [d.register_forward_hook(make_recorder(i)) for i, d in enumerate(decoder_layers(model))]
    try:
        out = model(input_ids, use_cache=keep_cache, **last_logits_kwargs(model))
    finally:
        for h in handles:
            h.remove()
    activations = [c for c in captured if c is not None]
    if len(activations) != len(captured):
        raise RuntimeError("a unit projection did not run in the plain pass")
    return PlainPass(torch.stack(activations), answer_prob(out.logits, token).item(),
                     outputs if record_layers else None, out.past_key_values if keep_cache else None)
