"""``ircan tune``: choose h and beta on the dev split with reversible in-memory reweighting.

Every grid point patches one loaded model inside :func:`~ircan_serve.reweight.reweighted`, scores
the dev rows with the task's logit metric, and checks the patched model against the original on
the same rows *without* context (top-1 agreement, KL). Points whose agreement falls below
``min_agreement`` are marked as collapsed and never chosen: large h with large beta breaks small
models (../shared/FINDINGS.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

from ..config import PAPER_BETA, PAPER_H, SMALL_BETA
from ..data import ConflictExample
from ..errors import IrcanError
from ..reweight import reweighted
from ..selection import NeuronSet
from .metrics import Score, agreement, logit_score, next_token_logits



class GridPoint(BaseModel):
    h: int
    beta: float
    dev: Score
    agreement: float = Field(description="Top-1 agreement with the original, prompts without context.")
    kl: float = Field(description="Mean KL(original || patched), prompts without context.")
    collapsed: bool


class TuneResult(BaseModel):
    """The grid, the original model's dev score, and the choice."""

    original: Score
    grid: list[GridPoint]
    best: GridPoint | None
    min_agreement: float
    seconds: float

    def table(self) -> list[list[str]]:
        rows = []
        for p in self.grid:
            rows.append([str(p.h), f"{p.beta:g}", f"{p.dev.accuracy:.3f}", f"{p.dev.stubbornness:.3f}",
                         f"{p.agreement:.2f}", f"{p.kl:.3f}", "collapsed" if p.collapsed else ""])
        return rows


def tune(model: Any, tokenizer: Any, neurons: NeuronSet, dev: Sequence[ConflictExample], *,
         hs: Sequence[int] = PAPER_H, betas: Sequence[float] = SMALL_BETA + PAPER_BETA,
         min_agreement: float = 0.8, progress: bool = True) -> TuneResult:
    """Grid-search h and beta on ``dev``; the best non-collapsed point by dev accuracy.

    Ties are broken by lower stubbornness, then smaller h, then beta closer to 1.
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
    grid = []
    for h, beta in tqdm([(h, b) for h in hs for b in betas], desc="tune h x beta", disable=not progress):
        with reweighted(model, neurons.top(h), beta):
            dev_score = logit_score(model, tokenizer, dev)
            agree, kl = agreement(model, tokenizer, plain, reference)
        grid.append(GridPoint(h=h, beta=beta, dev=dev_score, agreement=agree, kl=kl,
                              collapsed=agree < min_agreement))
    candidates = [p for p in grid if not p.collapsed]
    best = max(candidates, key=lambda p: (p.dev.accuracy, -p.dev.stubbornness, -p.h, -abs(p.beta - 1)),
               default=None)
    return TuneResult(original=original, grid=grid, best=best, min_agreement=min_agreement,
                      seconds=time.perf_counter() - t0)


def write_choice_to_recipe(path: Any, h: int, beta: float) -> None:
    """Set ``beta`` (top level) and ``[selection] num_neurons`` in a recipe file, keeping its comments."""
    import re
    from pathlib import Path

    path = Path(path)
    lines = path.read_text().splitlines()
    section, seen = "", set()
    for i, line in enumerate(lines):
        header = re.match(r"\s*\[([^\]]+)\]", line)
        if header:
            section = header.group(1).strip()
            continue
        key = re.match(r"\s*(\w+)\s*=", line)
        if key and (section, key.group(1)) == ("", "beta"):
            lines[i], _ = f"beta = {beta!r}", seen.add("beta")
        elif key and (section, key.group(1)) == ("selection", "num_neurons"):
            lines[i], _ = f"num_neurons = {h}", seen.add("h")
    if "beta" not in seen:
        first_table = next((i for i, l in enumerate(lines) if re.match(r"\s*\[", l)), len(lines))
        lines.insert(first_table, f"beta = {beta!r}")
    if "h" not in seen:
        at = next((i for i, l in enumerate(lines) if re.match(r"\s*\[selection\]", l)), None)
        if at is None:
            lines += ["", "[selection]", f"num_neurons = {h}"]
        else:
            lines.insert(at + 1, f"num_neurons = {h}")
    path.write_text("\n".join(lines) + "\n")
