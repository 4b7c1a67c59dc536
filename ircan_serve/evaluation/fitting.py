"""A factor per unit, fitted on the dev rows under the collapse checks (``ircan tune --fit``).

One beta for every unit is a blunt tool: a unit that helps a little at x2 may break the model at
x15, and a unit that carries the memorized answer is better weakened. The fit is greedy forward
selection: from the most frequent units of each kind (``candidates``), each round tries every
unit not chosen yet at every factor of ``factors`` on top of the units chosen so far, ranks the
tries by dev accuracy (the task's first-token score, on every dev row, all context formats
mixed), and keeps the best try that passes the same checks as the grid (top-1 agreement without
context, locality and agreeing contexts in every format, irrelevant documents over all rows) and
gains at least one dev row. It stops when no try does, or at ``max_units``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

from ..data import ConflictExample
from ..errors import IrcanError
from ..reweight import reweighted
from ..units import Unit, UnitSet
from .metrics import Score, logit_score
from .tuning import Baseline, GridPoint, score_point

FACTORS = (0.0, 0.5, 2.0, 5.0, 10.0)
"""The factors tried per unit: erase, halve, and three strengths of enhancement."""


class FitStep(BaseModel):
    unit: Unit
    point: GridPoint = Field(description="The dev score and checks with the units chosen so far.")
    tried: int


class FitResult(BaseModel):
    """The chosen units with their fitted factors, and each step of the fit."""

    original: Score
    steps: list[FitStep]
    units: UnitSet
    seconds: float


def _tries(model: Any, tokenizer: Any, dev: Sequence[ConflictExample], chosen: list[Unit], candidates: list[Unit],
           factors: Sequence[float], template: UnitSet) -> list[tuple[float, Unit]]:
    """(dev accuracy, unit with its factor) of every untried unit x factor on top of ``chosen``."""
    from tqdm.auto import tqdm

    taken = {(u.kind, u.layer, u.index) for u in chosen}
    options = [u.model_copy(update={"scale": f}) for u in candidates if (u.kind, u.layer, u.index) not in taken
               for f in factors]
    out = []
    for unit in tqdm(options, desc=f"fit: unit {len(chosen) + 1}", leave=False):
        with reweighted(model, template.model_copy(update={"neurons": [*chosen, unit]})):
            out.append((logit_score(model, tokenizer, dev).accuracy, unit))
    return sorted(out, key=lambda t: -t[0])


def fit_factors(model: Any, tokenizer: Any, candidates: UnitSet, dev: Sequence[ConflictExample], *,
                factors: Sequence[float] = FACTORS, max_units: int = 6, min_agreement: float = 0.8,
                max_drop: float = 0.02, checked_per_round: int = 3,
                overall_rows: Sequence[ConflictExample] | None = None) -> FitResult:
    """Greedy forward selection of units and their factors on ``dev`` (see the module docstring);
    the ``checked_per_round`` best tries of a round are checked, best first; the checks held over
    all rows take ``overall_rows`` (default ``dev``; :func:`.tuning.tune`)."""
    if not dev:
        raise IrcanError("the dev split has no rows")
    t0 = time.perf_counter()
    base = Baseline.measure(model, tokenizer, dev, overall_rows)
    original = logit_score(model, tokenizer, dev)
    chosen: list[Unit] = []
    steps: list[FitStep] = []
    best = original.accuracy
    template = candidates.model_copy(update={"neurons": [], "beta": None, "rule": "fitted"})
    while len(chosen) < max_units:
        tries = _tries(model, tokenizer, dev, chosen, candidates.neurons, factors, template)
        step = None
        for accuracy, unit in tries[:checked_per_round]:
            if accuracy * len(dev) < best * len(dev) + 1 - 1e-9:
                break  # no try gains a row
            units = template.model_copy(update={"neurons": [*chosen, unit]})
            point = score_point(model, tokenizer, dev, base, units,
                                ("paper", units.count("neuron"), units.count("head"), unit.scale or 1.0),
                                min_agreement, max_drop)
            if not point.collapsed:
                step = FitStep(unit=unit, point=point, tried=len(tries))
                break
        if step is None:
            break
        chosen.append(step.unit)
        steps.append(step)
        best = step.point.dev.accuracy
    units = template.model_copy(update={"neurons": chosen, "beta": max((u.scale or 1.0 for u in chosen), default=1.0)})
    return FitResult(original=original, steps=steps, units=units, seconds=time.perf_counter() - t0)
