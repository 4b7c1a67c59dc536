"""The architecture table: where each model family keeps its FFN output projection.

IRCAN's neurons are the inputs of each decoder layer's FFN output projection (Llama's
``mlp.down_proj``). This table is the only place in the project that knows, per
``config.model_type``, where the decoder layers live, what the projection is called and along
which weight axis its input neurons run (``nn.Linear`` stores ``(out, in)``, so neurons are
columns; GPT-2's ``Conv1D`` stores ``(in, out)``, so neurons are rows), and whether the
projection's output joins the residual stream as it is (the fast attribution path relies on it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from .errors import IrcanError


@dataclass(frozen=True)
class FFNLayout:
    """Where one family keeps its FFN output projections."""

    layers: str
    """Dotted path, from the ``*ForCausalLM`` model, of the list of decoder layers."""
    ffn_out: str
    """Dotted path, inside one decoder layer, of the FFN output projection."""
    neuron_axis: int
    """Axis of that projection's weight that indexes FFN neurons (1 for Linear, 0 for Conv1D)."""
    adds_to_residual: bool = True
    """The projection's output joins the residual stream as it is (no norm or scale after it),
    so changing its input changes the layer's output by ``proj(new) - proj(old)``: the fast path
    then skips the rest of the patched layer. False for post-FFN norms (Gemma 2/3, OLMo 2) and
    Granite's residual multiplier."""

    def weight_name(self, layer: int) -> str:
        """State-dict / safetensors name of the projection weight of ``layer``."""
        return f"{self.layers}.{layer}.{self.ffn_out}.weight"

    def weight_names(self, layer: int) -> tuple[str, ...]:
        """Every name a checkpoint may store that weight under: with the base model's prefix
        (``transformer.h.0.mlp.c_proj.weight``) or without it, as base-model checkpoints such
        as the original GPT-2 do (``h.0.mlp.c_proj.weight``)."""
        full = self.weight_name(layer)
        prefix, _, rest = self.layers.partition(".")
        return (full, f"{rest}.{layer}.{self.ffn_out}.weight") if rest else (full,)


_LLAMA_LIKE = FFNLayout("model.layers", "mlp.down_proj", 1)
_POST_NORMED = FFNLayout("model.layers", "mlp.down_proj", 1, adds_to_residual=False)

ARCHITECTURES: dict[str, FFNLayout] = {
    "llama": _LLAMA_LIKE,  # Llama 2/3, SmolLM/SmolLM2
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _POST_NORMED,
    "gemma3_text": _POST_NORMED,
    "phi3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _POST_NORMED,
    "granite": _POST_NORMED,  # the FFN output is scaled by residual_multiplier
    "gpt2": FFNLayout("transformer.h", "mlp.c_proj", 0),
    "gpt_neox": FFNLayout("gpt_neox.layers", "mlp.dense_4h_to_h", 1),
    "gptj": FFNLayout("transformer.h", "mlp.fc_out", 1),
}


def layout_for(model_type: str) -> FFNLayout:
    """The FFN layout of ``model_type``, or a clear error naming the unsupported type."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise IrcanError(
            f"architecture {model_type!r} is not supported: IRCAN needs a dense FFN that ends in "
            f"one output projection. Supported model types: {known}. To add one, add a row to "
            "ircan_serve/architectures.py:ARCHITECTURES."
        ) from None


def _get(obj: object, dotted: str) -> object:
    for part in dotted.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)  # type: ignore[index]
    return obj


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a ``*ForCausalLM`` model, in order."""
    layout = layout_for(model.config.model_type)
    return list(_get(model, layout.layers))  # type: ignore[call-overload]


def ffn_out_projections(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Each decoder layer's FFN output projection; its *input* holds the FFN neurons."""
    layout = layout_for(model.config.model_type)
    return [_get(layer, layout.ffn_out) for layer in decoder_layers(model)]  # type: ignore[misc]


def ffn_width(model: torch.nn.Module) -> int:
    """Number of FFN neurons per layer (d_ff)."""
    layout = layout_for(model.config.model_type)
    return int(ffn_out_projections(model)[0].weight.shape[layout.neuron_axis])
