"""How ``ircan tune --fit`` orders a round's tries before checking them (:data:`RANKS`), apart from
:mod:`.fitting` so that the CLI can list the ranks without importing torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

from ..units import Unit

Rank = Literal["accuracy", "efficiency"]
Move = Literal["add", "change", "drop"]

_AGREEMENT_FLOOR = 0.005
"""Efficiency's divisor for a try that spends no agreement: a quarter of one prompt in 200."""


class Try(NamedTuple):
    """One try of a fit round: its dev accuracy and agreement, the units, the unit moved and how."""

    accuracy: float
    agreement: float
    units: list[Unit]
    unit: Unit
    move: Move


@dataclass(frozen=True)
class FitRank:
    """How a round orders its tries before they are checked (``ircan tune --fit --rank``)."""

    description: str
    key: Callable[[Try, float, float], float]
    """(try, dev accuracy so far, agreement so far) -> higher is checked first."""


RANKS: dict[str, FitRank] = {
    "accuracy": FitRank("the try with the best dev accuracy first", lambda t, best, agree: t.accuracy),
    "efficiency": FitRank(
        "dev rows gained per point of top-1 agreement spent first (agreement is the budget every unit draws on: "
        "a unit that buys a little for nothing goes before one that buys more and spends the margin)",
        lambda t, best, agree: (t.accuracy - best) / max(agree - t.agreement, _AGREEMENT_FLOOR)),
}
