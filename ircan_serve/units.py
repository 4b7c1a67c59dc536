"""What attribution scores and export scales: the unit kinds, one table beside the architectures.

A *unit* is a slice of the input of one output projection in one decoder layer. Scaling the
slice's weights scales what the unit writes into the residual stream:

* ``neuron``: one FFN neuron, one input feature of the FFN output projection (Llama's
  ``mlp.down_proj``), the unit of IRCAN (NeurIPS 2024);
* ``head``: one attention head, its ``head_dim`` input features of the attention output
  projection (``self_attn.o_proj``), the unit of head-pruning and head-scaling work on knowledge
  conflicts (PH3, ACL 2024; Yu, Merullo & Pavlick, EMNLP 2023). With grouped-query attention
  the heads are the query heads: each writes its own ``head_dim`` slice of ``o_proj``'s input.

Attribution scores every input feature of a projection; a unit's score (and effect) is the sum
over its features, since integrated gradients are additive along one straight path.
:data:`UNIT_KINDS` is the only place that says where a kind lives; everything else (attribution,
selection, export, verify, reweighting, the manifest) reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .architectures import ArchitectureLayout, decoder_layers, get_path, layout_for, weight_of
from .config import Rule, SelectionConfig
from .errors import IrcanError
from .files import atomic_write

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

UnitKindName = Literal["neuron", "head"]


@dataclass(frozen=True)
class UnitKind:
    """Where one kind of unit lives and how wide it is."""

    name: str
    projection: Callable[[ArchitectureLayout], str | None]
    """The dotted path, inside a decoder layer, of the projection whose input holds the units
    (None where the family's table row lacks it)."""
    axis: Callable[[ArchitectureLayout], int]
    """The axis of that projection's weight that indexes its input features."""
    width: Callable[[Any], int]
    """Input features per unit, from the model config (1 for a neuron, head_dim for a head)."""
    row_field: str
    """The table column (of :class:`~ircan_serve.architectures.ArchitectureLayout`) that holds
    the projection, named in errors."""


def head_dim(config: Any) -> int:
    """Features per attention head: the config's ``head_dim``, else hidden size / heads."""
    explicit = getattr(config, "head_dim", None)
    if isinstance(explicit, int) and explicit > 0:
        return explicit
    return int(config.hidden_size // config.num_attention_heads)


UNIT_KINDS: dict[str, UnitKind] = {
    "neuron": UnitKind("neuron", lambda layout: layout.ffn_out, lambda layout: layout.neuron_axis,
                       lambda _config: 1, "ffn_out"),
    "head": UnitKind("head", lambda layout: layout.attn_out, lambda layout: layout.attn_axis,
                     head_dim, "attn_out"),
}


def unit_kind(name: str) -> UnitKind:
    """The kind called ``name``, or an error naming the kinds there are."""
    try:
        return UNIT_KINDS[name]
    except KeyError:
        raise IrcanError(f"unit kind {name!r} does not exist; kinds: {', '.join(UNIT_KINDS)}") from None


def projection_path(model_type: str, kind: str) -> str:
    """Where ``kind``'s projection lives in a ``model_type`` decoder layer, or an error saying the
    architecture table's row for that family lacks it."""
    spec = unit_kind(kind)
    path = spec.projection(layout_for(model_type))
    if path is None:
        raise IrcanError(f"{model_type} models have no {kind} units in the architecture table: its row "
                         f"has no {spec.row_field}; add it in ircan_serve/architectures.py:ARCHITECTURES")
    return path


def projections(model: PreTrainedModel, kind: str = "neuron") -> list[torch.nn.Module]:
    """Each decoder layer's projection whose *input* holds ``kind``'s units."""
    path = projection_path(model.config.model_type, kind)
    return [get_path(layer, path) for layer in decoder_layers(model)]


def weight_axis(model_type: str, kind: str) -> int:
    """The axis of ``kind``'s projection weight that indexes its input features."""
    return unit_kind(kind).axis(layout_for(model_type))


def unit_width(config: Any, kind: str) -> int:
    """Input features per unit of ``kind``."""
    return unit_kind(kind).width(config)


def units_per_layer(model: PreTrainedModel, kind: str = "neuron") -> int:
    """How many units of ``kind`` each layer has (d_ff neurons, or attention heads)."""
    first = projections(model, kind)[0]
    features = int(weight_of(first).shape[weight_axis(model.config.model_type, kind)])
    return features // unit_width(model.config, kind)


def weight_names(model_type: str, kind: str, layer: int) -> tuple[str, ...]:
    """Every name a checkpoint may store ``kind``'s projection weight of ``layer`` under: with the
    base model's prefix (``model.layers.0.mlp.down_proj.weight``) or without it, as base-model
    checkpoints such as the original GPT-2 do (``h.0.mlp.c_proj.weight``)."""
    layers = layout_for(model_type).layers
    full = f"{layers}.{layer}.{projection_path(model_type, kind)}.weight"
    _prefix, _, rest = layers.partition(".")
    return (full, f"{rest}.{layer}.{projection_path(model_type, kind)}.weight") if rest else (full,)


def feature_indices(index: int, width: int) -> range:
    """The projection input features of unit ``index`` when each unit is ``width`` wide."""
    return range(index * width, (index + 1) * width)


class Unit(BaseModel):
    """One unit: the ``index``-th neuron or head of layer ``layer``, as selected."""

    model_config = ConfigDict(frozen=True)
    kind: UnitKindName = Field("neuron", description="'neuron' (FFN) or 'head' (attention); files "
                               "written before heads existed hold neurons and have no kind.")
    layer: int = Field(ge=0)
    index: int = Field(ge=0)
    count: int = Field(0, ge=0, description="Examples whose top-z set held this unit.")
    mean_score: float = Field(0.0, description="Mean score over those examples.")
    effect: float | None = Field(None, description="Sum over the attribution rows of a * mean "
                                 "gradient: > 0 means scaling the unit up raises P(context's answer).")
    scale: float | None = Field(None, description="The factor on this unit's output weights "
                                "(None: the set's beta).")

    @property
    def label(self) -> str:
        """``19:201`` for a neuron, ``h12:3`` for a head."""
        return f"{'h' if self.kind == 'head' else ''}{self.layer}:{self.index}"

    @classmethod
    def parse(cls, text: str) -> Unit:
        """A unit from ``19:201x5`` (neuron 201 of layer 19, factor 5) or ``h12:3x0`` (head 3 of
        layer 12, erased): how a recipe's ``fitted`` list writes them."""
        import re

        m = re.fullmatch(r"\s*(h?)(\d+):(\d+)\s*x\s*([0-9.eE+-]+)\s*", text)
        if m is None:
            raise IrcanError(f"unit {text!r} is not LAYER:INDEXxFACTOR (a neuron, e.g. 19:201x5) or "
                             "hLAYER:INDEXxFACTOR (a head, e.g. h12:3x0)")
        return cls(kind="head" if m[1] else "neuron", layer=int(m[2]), index=int(m[3]), scale=float(m[4]))

    @property
    def written(self) -> str:
        """The unit as a recipe's ``fitted`` list writes it (:meth:`parse` reads it back)."""
        return f"{self.label}x{self.scale if self.scale is not None else 1.0:g}"


def units_per_layer_of(config: Any, kind: str) -> int:
    """How many units of ``kind`` each layer of a model with ``config`` has, without loading it."""
    unit_kind(kind)
    if kind == "head":
        return int(config.num_attention_heads)
    hidden: int = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 0
    width: int = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    return width


class UnitSet(BaseModel):
    """The selected units and how they were selected (``neurons.json``)."""

    neurons: list[Unit] = Field(description="The units, most frequent first (the name predates heads).")
    selection: SelectionConfig
    n_examples: int = Field(description="Examples the counts are taken over.")
    beta: float | None = Field(None, description="Chosen beta, once tuned or set.")
    rule: Rule | Literal["fitted"] | None = Field(None, description="How beta became the units' scales, once set "
                                                  "('fitted': a factor per unit, ircan tune --fit).")

    @property
    def units(self) -> list[Unit]:
        return self.neurons

    def scaled(self, beta: float, rule: Rule = "paper") -> UnitSet:
        """A copy whose units carry their factor: ``beta`` for all (``paper``), or ``beta`` /
        ``1/beta`` by the sign of each unit's effect (``signed``)."""
        if beta < 0:
            raise IrcanError(f"beta must be >= 0, got {beta}")
        if rule == "signed":
            if beta == 0:
                raise IrcanError("the signed rule needs beta > 0 (1/beta goes on the units that push "
                                 "away); erasing is the paper rule with beta = 0")
            missing = [u.label for u in self.neurons if u.effect is None]
            if missing:
                raise IrcanError(f"units {', '.join(missing)} have no effect recorded: the signed rule "
                                 "needs an attribution store of version 2 (rerun `ircan attribute`)")
        units = [u.model_copy(update={"scale": beta if rule == "paper" or (u.effect or 0) > 0 else 1 / beta})
                 for u in self.neurons]
        return self.model_copy(update={"neurons": units, "beta": beta, "rule": rule})

    def scales(self) -> list[float]:
        """The factor of each unit (its ``scale``, else the set's ``beta``)."""
        out = []
        for u in self.neurons:
            factor = u.scale if u.scale is not None else self.beta
            if factor is None:
                raise IrcanError(f"unit {u.label} has no scale and the set no beta")
            out.append(float(factor))
        return out

    def top(self, h: int, g: int | None = None) -> UnitSet:
        """The first ``h`` neurons and the first ``g`` heads (all of them when None; each kind is
        sorted by frequency)."""
        neurons = [u for u in self.neurons if u.kind == "neuron"][:h]
        heads = [u for u in self.neurons if u.kind == "head"][:g]
        return self.model_copy(update={"neurons": neurons + heads})

    def count(self, kind: str) -> int:
        """How many units of ``kind`` the set holds."""
        return sum(u.kind == kind for u in self.neurons)

    def save(self, path: str | Path) -> None:
        atomic_write(path, self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> UnitSet:
        path = Path(path)
        if not path.is_file():
            raise IrcanError(f"neuron file {path} does not exist; `ircan select` writes it")
        try:
            return cls.model_validate_json(path.read_text())
        except ValidationError as e:
            raise IrcanError(f"{path} is not a valid neurons file:\n{e}") from e
