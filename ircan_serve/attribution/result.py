"""The attribution of one example: scores, activations and probabilities, for one unit kind."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import IrcanError


@dataclass
class Attribution:
    """The scores of one example.

    Scores and activations are per *input feature* of the kind's projection: a neuron is one
    feature, a head ``head_dim`` adjacent features; :meth:`unit_scores` and :meth:`unit_effects`
    sum them per unit.
    """

    example_id: str
    answer_token: int
    """Vocabulary id of the first token of the context's answer."""
    scores: torch.Tensor
    """(n_layers, features) float32 integrated-gradient scores; rows of unscored layers are 0."""
    prob_with_context: float
    prob_without_context: float
    activations_with: torch.Tensor | None = None
    """(n_layers, features) float32 activations a with the context (None in stores before version 2)."""
    activations_without: torch.Tensor | None = None
    """(n_layers, features) float32 activations a' without the context."""
    kind: str = "neuron"
    """The unit kind these features belong to (see :data:`~ircan_serve.units.UNIT_KINDS`)."""
    width: int = 1
    """Features per unit (1 for neurons, head_dim for heads)."""

    def effect(self) -> torch.Tensor:
        """(n_layers, features) a * mean gradient: the first-order change of P(answer) per unit of
        log-scale on each feature's output weights, i.e. d P / d log(beta) at beta = 1.

        Positive: scaling the feature up raises P(context's answer). The IRCAN score
        (a - a') * mean gradient does not fix this sign, since SwiGLU activations are signed.
        """
        if self.activations_with is None or self.activations_without is None:
            raise IrcanError(f"the record of {self.example_id!r} has no activations: it comes from an "
                             "attribution store older than version 2; rerun `ircan attribute` into a new store")
        delta = self.activations_with - self.activations_without  # (L, F)
        safe = torch.where(delta == 0, torch.ones_like(delta), delta)
        mean_grad = torch.where(delta == 0, torch.zeros_like(delta), self.scores / safe)
        return self.activations_with * mean_grad

    def _per_unit(self, values: torch.Tensor) -> torch.Tensor:
        if self.width == 1:
            return values
        return values.reshape(values.shape[0], -1, self.width).sum(-1)  # (L, units)

    def unit_scores(self) -> torch.Tensor:
        """(n_layers, units) scores summed over each unit's features."""
        return self._per_unit(self.scores)

    def unit_effects(self) -> torch.Tensor:
        """(n_layers, units) effects summed over each unit's features."""
        return self._per_unit(self.effect())
