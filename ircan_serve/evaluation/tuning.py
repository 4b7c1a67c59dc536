"""``ircan tune``: choose the rule, h and beta on the dev split with reversible in-memory reweighting.

Every grid point patches one loaded model inside :func:`~ircan_serve.reweight.reweighted`, scores
the dev rows with the task's logit metric, and checks the patched model against the original:
on the same rows *without* context (top-1 agreement, KL), on the rows' locality facts, on
contexts that agree with the true answer and, where the rows have them, on documents about other
subjects only (where the model must keep its memorized answer). Points that fail a check are
marked as collapsed and never chosen: large h with large beta breaks small models
(../shared/FINDINGS.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from ..config import PAPER_BETA, PAPER_H, SMALL_BETA, Rule
from ..data import ConflictExample
from ..errors import IrcanError
from ..generation import next_token_logits
from ..reweight import reweighted
from ..units import UnitSet
from .metrics import SIDE_CHECKS, Score, agreement, logit_score, side_scores


class SideChecks(BaseModel):
    """Accuracy where the patched model must keep the original's answers (first token)."""

    locality: float | None = Field(None, description="Locality facts without context (true answer).")
    agreeing: float | None = Field(None, description="Contexts that state the true answer.")
    irrelevant: float | None = Field(None, description="Documents about other subjects only: the memorized answer.")


class GridPoint(BaseModel):
    rule: Rule = "paper"
    h: int
    g: int = Field(0, description="Attention heads with the h neurons.")
    beta: float
    dev: Score
    agreement: float = Field(description="Top-1 agreement with the original, prompts without context.")
    kl: float = Field(description="Mean KL(original || patched), prompts without context.")
    checks: SideChecks = SideChecks()
    by_format: dict[str, float] = Field(default_factory=dict, description="Dev accuracy per context format.")
    collapsed: bool
    reason: str = ""

    @property
    def enhancing(self) -> bool:
        return self.beta > 1


class TuneResult(BaseModel):
    """The grid, the original model's dev score, and the choice."""

    original: Score
    original_checks: SideChecks = SideChecks()
    grid: list[GridPoint]
    best: GridPoint | None
    """The best non-collapsed *enhancing* point (beta > 1): what the product ships as "ircan"."""
    best_shrink: GridPoint | None = None
    """The best non-collapsed point with beta < 1 (erasing or weakening), reported apart."""
    min_agreement: float
    max_drop: float = 0.02
    seconds: float
    overall_rows: int | None = Field(None, description="Rows of the checks held over all rows at once (the "
                                     "irrelevant documents): the dev rows, or every row that is not a test row.")

    def table(self) -> list[list[str]]:
        rows = []
        for p in self.grid:
            units = f"{p.h}+{p.g}h" if p.g else str(p.h)
            rows.append([p.rule, units, f"{p.beta:g}", f"{p.dev.accuracy:.3f}", f"{p.dev.stubbornness:.3f}",
                         f"{p.agreement:.2f}", *(_fmt(getattr(p.checks, name)) for name in SIDE_CHECKS), f"{p.kl:.3f}",
                         p.reason])
        return rows


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


PER_FORMAT = [name for name, check in SIDE_CHECKS.items() if check.per_format]
"""Side checks held in each context format of the dev rows apart; the others over all rows at once
(:attr:`Baseline.overall_rows`)."""
OVERALL = [name for name in SIDE_CHECKS if name not in PER_FORMAT]


def side_checks(model: Any, tokenizer: Any, dev: Sequence[ConflictExample],
                names: Sequence[str] | None = None) -> SideChecks:
    """The side checks' accuracies (:func:`.metrics.side_scores`) of the model as it is."""
    return SideChecks(**{name: s.accuracy if s else None
                         for name, s in side_scores(model, tokenizer, dev, names).items()})


def by_format(dev: Sequence[ConflictExample]) -> dict[str, list[ConflictExample]]:
    """The dev rows grouped by their context format (one group when they are all as loaded)."""
    from ..data.contexts import format_of

    groups: dict[str, list[ConflictExample]] = {}
    for e in dev:
        groups.setdefault(format_of(e), []).append(e)
    return groups


def accuracy_by_format(score: Score, dev: Sequence[ConflictExample],
                       groups: dict[str, list[ConflictExample]]) -> dict[str, float]:
    """``score``'s accuracy (its per-row ``correct``, in ``dev``'s order) within each group of :func:`by_format`."""
    ids = {e.id: i for i, e in enumerate(dev)}
    return {name: sum(score.correct[ids[e.id]] for e in rows) / len(rows)  # type: ignore[index]
            for name, rows in groups.items()}


def collapse_reason(agree: float, checks: SideChecks, base: SideChecks, min_agreement: float,
                     max_drop: float) -> str:
    reasons = []
    if agree < min_agreement:
        reasons.append(f"agreement {agree:.2f} < {min_agreement}")
    for name in SIDE_CHECKS:
        now, before = getattr(checks, name), getattr(base, name)
        if now is not None and before is not None and before - now > max_drop:
            reasons.append(f"{name} -{before - now:.3f}")
    return "; ".join(reasons)


def _merged(checks: dict[str, SideChecks], groups: dict[str, list[ConflictExample]], overall: SideChecks
            ) -> SideChecks:
    """Side checks over all rows: each dev format's accuracy weighted by its rows, and ``overall``'s
    checks (those held over all rows) as they are."""
    out = {}
    for field in PER_FORMAT:
        parts = [(getattr(c, field), len(groups[name])) for name, c in checks.items() if getattr(c, field) is not None]
        out[field] = sum(v * n for v, n in parts) / sum(n for _, n in parts) if parts else None
    return SideChecks(**out, **{field: getattr(overall, field) for field in OVERALL})


@dataclass
class Baseline:
    """The original model on the dev rows (and the rows of the checks held over all rows): what
    every grid point is checked against."""

    groups: dict[str, list[ConflictExample]]
    plain: list[str]
    reference: Any
    checks: dict[str, SideChecks]
    overall: SideChecks
    overall_rows: list[ConflictExample]
    """The rows of the checks held over all rows (:data:`OVERALL`): the dev rows, or more."""

    @classmethod
    def measure(cls, model: Any, tokenizer: Any, dev: Sequence[ConflictExample],
                overall_rows: Sequence[ConflictExample] | None = None) -> Baseline:
        """The original's logits without context, its side checks in each context format of ``dev``
        (:data:`PER_FORMAT`) and over all of ``overall_rows`` (the others; default ``dev``)."""
        groups = by_format(dev)
        plain = [e.prompt_without_context for e in dev]
        rows = list(overall_rows if overall_rows is not None else dev)
        return cls(groups, plain, next_token_logits(model, tokenizer, plain),
                   {name: side_checks(model, tokenizer, rows, PER_FORMAT) for name, rows in groups.items()},
                   side_checks(model, tokenizer, rows, OVERALL), rows)


def score_point(model: Any, tokenizer: Any, dev: Sequence[ConflictExample], base: Baseline, patch: UnitSet,
                key: tuple[Rule, int, int, float], min_agreement: float, max_drop: float) -> GridPoint:
    """One point (``patch``: units with their factors; ``key``: how it is labelled): scored on every
    dev row, checked in every context format (and over all rows for the checks not held per format)."""
    rule, h, g, beta = key
    with reweighted(model, patch):
        dev_score = logit_score(model, tokenizer, dev)
        agree, kl = agreement(model, tokenizer, base.plain, base.reference)
        # a point that already fails the agreement check is not scored on the side checks
        checked = agree >= min_agreement
        checks = ({name: side_checks(model, tokenizer, rows, PER_FORMAT) for name, rows in base.groups.items()}
                  if checked else {})
        overall = side_checks(model, tokenizer, base.overall_rows, OVERALL) if checked else SideChecks()
    reasons = [collapse_reason(agree, overall, base.overall, min_agreement, max_drop)]
    reasons += [f"{name}: {r}" if len(base.groups) > 1 else r for name, c in checks.items()
                if (r := collapse_reason(1.0, c, base.checks[name], min_agreement, max_drop))]
    reason = "; ".join(r for r in reasons if r)
    return GridPoint(rule=rule, h=h, g=g, beta=beta, dev=dev_score, agreement=agree, kl=kl,
                     checks=_merged(checks, base.groups, overall),
                     by_format=accuracy_by_format(dev_score, dev, base.groups), collapsed=bool(reason), reason=reason)


def tune(model: Any, tokenizer: Any, neurons: UnitSet, dev: Sequence[ConflictExample], *,
         hs: Sequence[int] = PAPER_H, betas: Sequence[float] = SMALL_BETA + PAPER_BETA,
         rules: Sequence[Rule] = ("paper", "signed"), min_agreement: float = 0.8,
         max_drop: float = 0.02, progress: bool = True, gs: Sequence[int] = (0,),
         overall_rows: Sequence[ConflictExample] | None = None) -> TuneResult:
    """Grid-search the rule, h (neurons), g (heads) and beta on ``dev``.

    A point is *collapsed* (never chosen) when its top-1 agreement with the original on the dev
    prompts without context falls below ``min_agreement``, or when accuracy on the dev rows'
    locality facts or agreeing contexts drops by more than ``max_drop`` in any context format of
    the dev rows, or the memorized answer after irrelevant documents over all ``overall_rows``
    (default: the dev rows; a recipe's tuning passes its attribution rows too)
    (:data:`.metrics.SIDE_CHECKS`). ``best`` is the best remaining enhancing point (beta > 1) by
    dev accuracy, ties broken by lower stubbornness, fewer units, beta closer to 1; ``best_shrink``
    the same among beta < 1. The signed rule takes only beta > 1 (below 1 it would weaken the
    units that help and enhance those that hurt), and beta = 1 is the original for both.
    """
    from tqdm.auto import tqdm

    if not dev:
        raise IrcanError("the dev split has no rows")
    hs = [h for h in hs if h <= neurons.count("neuron")]
    gs = [g for g in gs if g <= neurons.count("head")]
    if not hs or not gs:
        raise IrcanError(f"the unit set has {neurons.count('neuron')} neurons and {neurons.count('head')} heads; "
                         "every h (or g) of the grid is larger")
    t0 = time.perf_counter()
    base = Baseline.measure(model, tokenizer, dev, overall_rows)
    original = logit_score(model, tokenizer, dev)
    keys = [(r, h, g, b) for r in rules for h in hs for g in gs for b in betas
            if b != 1 and not (r == "signed" and b < 1) and h + g > 0]
    grid = [score_point(model, tokenizer, dev, base, neurons.top(k[1], k[2]).scaled(k[3], k[0]), k, min_agreement,
                        max_drop) for k in tqdm(keys, desc="tune rule x h x g x beta", disable=not progress)]

    def pick(cands: list[GridPoint]) -> GridPoint | None:
        return max(cands, key=lambda p: (p.dev.accuracy, -p.dev.stubbornness, -(p.h + p.g), -abs(p.beta - 1)),
                   default=None)

    ok = [p for p in grid if not p.collapsed]
    return TuneResult(original=original, original_checks=_merged(base.checks, base.groups, base.overall), grid=grid,
                      best=pick([p for p in ok if p.enhancing]),
                      best_shrink=pick([p for p in ok if p.beta < 1]), min_agreement=min_agreement,
                      max_drop=max_drop, seconds=time.perf_counter() - t0, overall_rows=len(base.overall_rows))
