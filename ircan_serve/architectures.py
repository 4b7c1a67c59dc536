"""The architecture table: where each model family keeps its decoder layers and output projections.

IRCAN's neurons are the inputs of each decoder layer's FFN output projection (Llama's
``mlp.down_proj``); attention heads are slices of the input of the attention output projection
(``self_attn.o_proj``). This table is the only place in the project that knows, per
``config.model_type``, where the decoder layers live, what the two projections are called,
along which weight axis their input features run (``nn.Linear`` stores ``(out, in)``, so input
features are columns; GPT-2's ``Conv1D`` stores ``(in, out)``, so they are rows), and whether
the FFN projection's output joins the residual stream as it is (the fast attribution path relies
on it). :mod:`ircan_serve.units` says which projection each unit kind uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

from .errors import IrcanError


@dataclass(frozen=True)
class ArchitectureLayout:
    """Where one family keeps its output projections."""

    layers: str
    """Dotted path, from the ``*ForCausalLM`` model, of the list of decoder layers."""
    ffn_out: str
    """Dotted path, inside one decoder layer, of the FFN output projection."""
    neuron_axis: int
    """Axis of that projection's weight that indexes FFN neurons (1 for Linear, 0 for Conv1D)."""
    adds_to_residual: bool = True
    """The FFN projection's output joins the residual stream as it is (no norm or scale after it),
    so changing its input changes the layer's output by ``proj(new) - proj(old)``: the fast path
    then skips the rest of the patched layer. False for post-FFN norms (Gemma 2/3, OLMo 2) and
    Granite's residual multiplier."""
    attn_out: str | None = None
    """Dotted path, inside one decoder layer, of the attention output projection, whose input is
    the heads' outputs side by side (``num_attention_heads x head_dim``); None: no head units."""
    attn_axis: int = 1
    """Axis of that projection's weight that indexes its input features."""


_LLAMA_LIKE = ArchitectureLayout("model.layers", "mlp.down_proj", 1, attn_out="self_attn.o_proj")
_POST_NORMED = ArchitectureLayout("model.layers", "mlp.down_proj", 1, adds_to_residual=False,
                                  attn_out="self_attn.o_proj")

ARCHITECTURES: dict[str, ArchitectureLayout] = {
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
    "gpt2": ArchitectureLayout("transformer.h", "mlp.c_proj", 0, attn_out="attn.c_proj", attn_axis=0),
    "gpt_neox": ArchitectureLayout("gpt_neox.layers", "mlp.dense_4h_to_h", 1, attn_out="attention.dense"),
    "gptj": ArchitectureLayout("transformer.h", "mlp.fc_out", 1, attn_out="attn.out_proj"),
}


def layout_for(model_type: str) -> ArchitectureLayout:
    """The layout of ``model_type``, or a clear error naming the unsupported type."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise IrcanError(
            f"architecture {model_type!r} is not supported: IRCAN needs a dense FFN that ends in "
            f"one output projection. Supported model types: {known}. To add one, add a row to "
            "ircan_serve/architectures.py:ARCHITECTURES."
        ) from None


def get_path(obj: Any, dotted: str) -> Any:
    """The attribute (or list item, for digits) at ``dotted`` below ``obj``."""
    for part in dotted.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def decoder_layers(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The decoder layers of a ``*ForCausalLM`` model, in order."""
    layout = layout_for(model.config.model_type)
    return list(get_path(model, layout.layers))


def weight_of(module: torch.nn.Module) -> torch.Tensor:
    """A projection's weight tensor (``nn.Module`` attributes are typed as tensor-or-module)."""
    import torch

    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.weight is not a tensor")
    return weight
