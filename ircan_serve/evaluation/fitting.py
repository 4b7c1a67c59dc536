"""A factor per unit, fitted on the dev rows under the collapse checks (``ircan tune --fit``).

One beta for every unit is a blunt tool: a unit that helps a little at x2 may break the model at
x15, and a unit that carries the memorized answer is better weakened. The fit is greedy forward
selection: from the most frequent units of each kind (``candidates``), each round tries every
unit not chosen yet at every factor of ``factors`` on top of the units chosen so far, measures
each try's dev accuracy (the task's first-token score, on every dev row, all context formats
mixed) and its top-1 agreement without context, ranks the tries that gain at least one dev row
and keep the agreement floor (:data:`RANKS`: by accuracy, or by rows gained per point of
agreement spent), and keeps the first of them that passes the same checks as the grid
(locality and agreeing contexts in every format, irrelevant documents over all rows). It stops
when no try does, or at ``max_units``.

Greedy selection is myopic: one unit at its best factor can spend the whole agreement margin
that several units at smaller factors would have shared (README, "Top 4 only"). Two remedies
are here: ``rank="efficiency"``, and ``start``: begin from a grid's choice and let each round
also move a chosen unit's factor or drop it (coordinate ascent from a point that passes).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field

from ..data import ConflictExample
from ..errors import IrcanError
from ..reweight import reweighted
from ..units import Unit, UnitSet
from .fit_ranks import RANKS, Move, Rank, Try
from .metrics import Score, agreement, logit_score
from .tuning import Baseline, GridPoint, accuracy_by_format, score_point

FACTORS = (0.0, 0.5, 2.0, 5.0, 10.0)
"""The factors tried per unit: erase, halve, and three strengths of enhancement."""


class FitStep(BaseModel):
    unit: Unit = Field(description="The unit added or changed, with its new factor (1 when dropped).")
    point: GridPoint = Field(description="The dev score and checks with the units chosen so far.")
    tried: int
    move: Literal["start"] | Move = Field(
        "add", description="'start': the units the fit began from; 'change': a chosen unit's factor moved; "
                           "'drop': a chosen unit removed.")
    units: list[str] = Field(default_factory=list, description="Every unit after this step, as a recipe's "
                                                               "fitted list writes them ('19:201x5').")


class FitResult(BaseModel):
    """The chosen units with their fitted factors, and each step of the fit."""

    original: Score
    original_by_format: dict[str, float] = Field(default_factory=dict, description="The original's dev accuracy "
                                                 "per context format.")
    steps: list[FitStep]
    units: UnitSet
    seconds: float


def _moves(chosen: list[Unit], candidates: list[Unit], factors: Sequence[float],
           adjust: bool) -> list[tuple[list[Unit], Unit, Move]]:
    """(units, the unit moved, move) of every try on top of ``chosen``: each unit not chosen yet at
    each factor, and with ``adjust`` each chosen unit at each other factor or dropped."""
    taken = {u.label for u in chosen}
    out: list[tuple[list[Unit], Unit, Move]] = []
    for u in (u for u in candidates if u.label not in taken):
        for f in factors:
            added = u.model_copy(update={"scale": f})
            out.append(([*chosen, added], added, "add"))
    if adjust:
        for i, u in enumerate(chosen):
            for f in factors:
                if f != u.scale:
                    moved = u.model_copy(update={"scale": f})
                    out.append(([*chosen[:i], moved, *chosen[i + 1:]], moved, "change"))
            out.append(([*chosen[:i], *chosen[i + 1:]], u.model_copy(update={"scale": 1.0}), "drop"))
    return out


def _tries(model: Any, tokenizer: Any, dev: Sequence[ConflictExample], base: Baseline,
           moves: list[tuple[list[Unit], Unit, Move]], template: UnitSet, label: str) -> list[Try]:
    """Dev accuracy and top-1 agreement without context (cheap: short prompts) of every move."""
    from tqdm.auto import tqdm

    out = []
    for units, unit, move in tqdm(moves, desc=label, leave=False):
        with reweighted(model, template.model_copy(update={"neurons": units})):
            accuracy = logit_score(model, tokenizer, dev).accuracy
            agree, _ = agreement(model, tokenizer, base.plain, base.reference)
        out.append(Try(accuracy, agree, units, unit, move))
    return out


def _ranked(tries: list[Try], best: float, agree_now: float, n_rows: int, min_agreement: float,
            rank: Rank) -> list[Try]:
    """The tries that gain at least one dev row and keep the agreement floor, in ``rank`` order."""
    gaining = [t for t in tries if t.accuracy * n_rows >= best * n_rows + 1 - 1e-9 and t.agreement >= min_agreement]
    return sorted(gaining, key=lambda t: -RANKS[rank].key(t, best, agree_now))


def fit_factors(model: Any, tokenizer: Any, candidates: UnitSet, dev: Sequence[ConflictExample], *,
                factors: Sequence[float] = FACTORS, max_units: int = 6, min_agreement: float = 0.8,
                max_drop: float = 0.02, checked_per_round: int = 3,
                overall_rows: Sequence[ConflictExample] | None = None, start: Sequence[Unit] = (),
                rank: Rank = "accuracy", max_rounds: int | None = None) -> FitResult:
    """Greedy selection of units and their factors on ``dev`` (see the module docstring); the
    ``checked_per_round`` best tries of a round (``rank`` orders them, :data:`RANKS`) are checked,
    best first; the checks held over all rows take ``overall_rows`` (default ``dev``;
    :func:`.tuning.tune`). With ``start`` (e.g. a grid's choice) the fit begins from those units,
    which must pass the checks, and each round also tries every chosen unit at the other factors
    and dropped. It stops when no try gains a row and passes, at ``max_units`` units, or after
    ``max_rounds`` rounds (default: ``max_units`` plus the starting units)."""
    if not dev:
        raise IrcanError("the dev split has no rows")
    if rank not in RANKS:
        raise IrcanError(f"unknown fit rank {rank!r}; use one of {', '.join(RANKS)}")
    t0 = time.perf_counter()
    base = Baseline.measure(model, tokenizer, dev, overall_rows)
    original = logit_score(model, tokenizer, dev)
    chosen: list[Unit] = [u.model_copy() for u in start]
    steps: list[FitStep] = []
    best, agree_now = original.accuracy, 1.0
    template = candidates.model_copy(update={"neurons": [], "beta": None, "rule": "fitted"})
    if chosen:
        units = template.model_copy(update={"neurons": chosen})
        point = score_point(model, tokenizer, dev, base, units, ("paper", units.count("neuron"), units.count("head"),
                                                                  max(u.scale or 1.0 for u in chosen)),
                            min_agreement, max_drop)
        if point.collapsed:
            raise IrcanError(f"the starting units ({', '.join(u.written for u in chosen)}) fail the checks: "
                             f"{point.reason}; start from a choice that passes them (or lower --min-agreement)")
        steps.append(FitStep(unit=chosen[-1], point=point, tried=0, move="start", units=[u.written for u in chosen]))
        best, agree_now = point.dev.accuracy, point.agreement
    rounds = max_rounds if max_rounds is not None else max_units + len(chosen)
    for n in range(1, rounds + 1):
        moves = _moves(chosen, candidates.neurons if len(chosen) < max_units else [], factors, bool(start))
        if not moves:
            break
        tries = _tries(model, tokenizer, dev, base, moves, template, f"fit: round {n} of at most {rounds}")
        step = None
        for t in _ranked(tries, best, agree_now, len(dev), min_agreement, rank)[:checked_per_round]:
            units = template.model_copy(update={"neurons": t.units})
            point = score_point(model, tokenizer, dev, base, units,
                                ("paper", units.count("neuron"), units.count("head"), t.unit.scale or 1.0),
                                min_agreement, max_drop)
            if not point.collapsed:
                step = FitStep(unit=t.unit, point=point, tried=len(tries), move=t.move,
                               units=[u.written for u in t.units])
                chosen = t.units
                break
        if step is None:
            break
        steps.append(step)
        best, agree_now = step.point.dev.accuracy, step.point.agreement
    units = template.model_copy(update={"neurons": chosen, "beta": max((u.scale or 1.0 for u in chosen), default=1.0)})
    return FitResult(original=original, original_by_format=accuracy_by_format(original, dev, base.groups), steps=steps,
                     units=units, seconds=time.perf_counter() - t0)
