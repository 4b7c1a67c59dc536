"""``ircan tune``: choose the rule, h and beta on the dev split with reversible in-memory reweighting.

Every grid point patches one loaded model inside :func:`~ircan_serve.reweight.reweighted`, scores
the dev rows with the task's logit metric, and checks the patched model against the original:
on the same rows *without* context (top-1 agreement, KL), on the rows' locality facts and on
contexts that agree with the true answer. Points that fail a check are marked as collapsed and
never chosen: large h with large beta breaks small models (../shared/FINDINGS.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

from ..config import PAPER_BETA, PAPER_H, SMALL_BETA, Rule
from ..data import ConflictExample
from ..errors import IrcanError
from ..generation import next_token_logits
from ..reweight import reweighted
from ..units import UnitSet
from .metrics import Score, agreement, logit_score, side_scores


class SideChecks(BaseModel):
    """Accuracy where the patched model must keep the original's answers (first token)."""

    locality: float | None = Field(None, description="Locality facts without context (true answer).")
    agreeing: float | None = Field(None, description="Contexts that state the true answer.")


class GridPoint(BaseModel):
    rule: Rule = "paper"
    h: int
    beta: float
    dev: Score
    agreement: float = Field(description="Top-1 agreement with the original, prompts without context.")
    kl: float = Field(description="Mean KL(original || patched), prompts without context.")
    checks: SideChecks = SideChecks()
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

    def table(self) -> list[list[str]]:
        rows = []
        for p in self.grid:
            rows.append([p.rule, str(p.h), f"{p.beta:g}", f"{p.dev.accuracy:.3f}", f"{p.dev.stubbornness:.3f}",
                         f"{p.agreement:.2f}", _fmt(p.checks.locality), _fmt(p.checks.agreeing), f"{p.kl:.3f}",
                         p.reason])
        return rows


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def side_checks(model: Any, tokenizer: Any, dev: Sequence[ConflictExample]) -> SideChecks:
    """The side checks' accuracies (:func:`.metrics.side_scores`) of the model as it is."""
    locality, agreeing = side_scores(model, tokenizer, dev)
    return SideChecks(locality=locality.accuracy if locality else None,
                      agreeing=agreeing.accuracy if agreeing else None)


def collapse_reason(agree: float, checks: SideChecks, base: SideChecks, min_agreement: float,
                     max_drop: float) -> str:
    reasons = []
    if agree < min_agreement:
        reasons.append(f"agreement {agree:.2f} < {min_agreement}")
    for name in ("locality", "agreeing"):
        now, before = getattr(checks, name), getattr(base, name)
        if now is not None and before is not None and before - now > max_drop:
            reasons.append(f"{name} -{before - now:.3f}")
    return "; ".join(reasons)


def tune(model: Any, tokenizer: Any, neurons: UnitSet, dev: Sequence[ConflictExample], *,
         hs: Sequence[int] = PAPER_H, betas: Sequence[float] = SMALL_BETA + PAPER_BETA,
         rules: Sequence[Rule] = ("paper", "signed"), min_agreement: float = 0.8,
         max_drop: float = 0.02, progress: bool = True) -> TuneResult:
    """Grid-search the rule, h and beta on ``dev``.

    A point is *collapsed* (never chosen) when its top-1 agreement with the original on the dev
    prompts without context falls below ``min_agreement``, or when accuracy on the dev rows'
    locality facts or agreeing contexts drops by more than ``max_drop`` (where the rows have
    them). ``best`` is the best remaining enhancing point (beta > 1) by dev accuracy, ties broken
    by lower stubbornness, smaller h, beta closer to 1; ``best_shrink`` the same among beta < 1.
    The signed rule takes only beta > 1 (below 1 it would weaken the neurons that help and
    enhance those that hurt), and beta = 1 is the original for both. Points below the agreement
    bound are not scored on the side checks (they are collapsed already).
    """
    from tqdm.auto import tqdm

    if not dev:
        raise IrcanError("the dev split has no rows")
    hs = [h for h in hs if h <= len(neurons.neurons)]
    if not hs:
        raise IrcanError(f"the neuron set has {len(neurons.neurons)} neurons; every h of the grid is larger")
    t0 = time.perf_counter()
    plain = [e.prompt_without_context for e in dev]
    reference = next_token_logits(model, tokenizer, plain)
    original = logit_score(model, tokenizer, dev)
    base_checks = side_checks(model, tokenizer, dev)
    points = [(r, h, b) for r in rules for h in hs for b in betas if b != 1 and not (r == "signed" and b < 1)]
    grid = []
    for rule, h, beta in tqdm(points, desc="tune rule x h x beta", disable=not progress):
        with reweighted(model, neurons.top(h).scaled(beta, rule)):
            dev_score = logit_score(model, tokenizer, dev)
            agree, kl = agreement(model, tokenizer, plain, reference)
            # a point that already fails the agreement check is not scored on the side checks
            checks = side_checks(model, tokenizer, dev) if agree >= min_agreement else SideChecks()
        reason = collapse_reason(agree, checks, base_checks, min_agreement, max_drop)
        grid.append(GridPoint(rule=rule, h=h, beta=beta, dev=dev_score, agreement=agree, kl=kl,
                              checks=checks, collapsed=bool(reason), reason=reason))

    def pick(cands: list[GridPoint]) -> GridPoint | None:
        return max(cands, key=lambda p: (p.dev.accuracy, -p.dev.stubbornness, -p.h, -abs(p.beta - 1)),
                   default=None)

    ok = [p for p in grid if not p.collapsed]
    return TuneResult(original=original, original_checks=base_checks, grid=grid,
                      best=pick([p for p in ok if p.enhancing]),
                      best_shrink=pick([p for p in ok if p.beta < 1]), min_agreement=min_agreement,
                      max_drop=max_drop, seconds=time.perf_counter() - t0)
