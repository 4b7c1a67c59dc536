"""``ircan eval``: every method on one test split, resumable, plus the side-effect check.

Per task (see :mod:`.metrics`): multiple choice scores the option letters' logits at the answer
position; completion (MemoTrap) and open QA also generate greedily (10 tokens) and score the text
(up to the first period for completion, whole-word containment for QA); all tasks report the
first-token score. With CAD the logits are combined as in :func:`ircan_serve.generation.cad_logits`.
Each finished method is appended to ``results.json`` at once, so an interrupted run keeps what
it computed and a rerun with the same settings continues after it.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field

from ..answers import answer_matches, answer_token_id, until_period
from ..data import ConflictExample
from ..errors import IrcanError
from ..files import atomic_write_json
from ..generation import cad_logits, greedy_generate, next_token_logits
from .methods import Method
from .metrics import SIDE_CHECKS, Score, agreement, score, score_choices, score_first_tokens, side_scores


class MethodResult(BaseModel):
    """One method (one seed) on the test split."""

    method: str
    seed: int | None = None
    first_token: Score
    generation: Score | None = None
    locality: Score | None = Field(None, description="Locality facts without context: the true answer's first token.")
    agreeing: Score | None = Field(None, description="Contexts stating the true answer: its first token.")
    irrelevant: Score | None = Field(None, description="Documents about other subjects only: the memorized "
                                     "answer's first token, kept.")
    seconds: float


class SideEffects(BaseModel):
    """The patched model on prompts without conflict (the rows' prompts without context)."""

    top1_agreement: float
    kl: float = Field(description="Mean KL(original || patched) of next-token distributions.")
    known: int = Field(description="Rows whose memorized answer the original predicts without context.")
    known_accuracy_original: float = 1.0
    known_accuracy_patched: float


def _first_tokens(model: Any, tokenizer: Any, examples: Sequence[ConflictExample], prompts: list[str],
                  alpha: float | None) -> torch.Tensor:
    logits = next_token_logits(model, tokenizer, prompts)  # (N, V)
    if alpha is not None:
        plain = next_token_logits(model, tokenizer, [e.prompt_without_context for e in examples])
        logits = cad_logits(logits, plain, alpha)
    return logits


def run_method(model: Any, tokenizer: Any, examples: list[ConflictExample], method: Method,
               alpha: float, max_new_tokens: int = 10) -> MethodResult:
    """Score ``method`` on ``examples`` (one task)."""
    import time

    t0 = time.perf_counter()
    task = examples[0].task
    cad = alpha if method.cad else None
    with method.patched(model):
        prompts = method.prompts(examples)
        logits = _first_tokens(model, tokenizer, examples, prompts, cad)
        if task == "multiple_choice":
            first = score_choices(tokenizer, logits, prompts, examples)
            generation = None
        else:
            first = score_first_tokens(tokenizer, logits, prompts, examples)
            texts = greedy_generate(model, tokenizer, prompts, max_new_tokens, cad_alpha=cad,
                                    prompts_without_context=[e.prompt_without_context for e in examples])
            if task == "completion":
                preds = [until_period(t) for t in texts]
                generation = score([p == until_period(e.answer) for p, e in zip(preds, examples)],
                                   [p == until_period(e.memorized) for p, e in zip(preds, examples)])
            else:
                generation = score([answer_matches(t, e.answer) for t, e in zip(texts, examples)],
                                   [answer_matches(t, e.memorized) for t, e in zip(texts, examples)])
        # the side checks measure a weight patch; prompt methods and CAD leave the weights as they are
        sides = (side_scores(model, tokenizer, examples)
                 if method.neurons is not None or method.name == "original" else {})
    return MethodResult(method=method.name, seed=method.seed, first_token=first, generation=generation,
                        **sides, seconds=time.perf_counter() - t0)


def side_effects(model: Any, tokenizer: Any, examples: list[ConflictExample], method: Method) -> SideEffects:
    """KL and top-1 agreement without context, and accuracy on the answers the original knows."""
    prompts = [e.prompt_without_context for e in examples]
    reference = next_token_logits(model, tokenizer, prompts)
    memorized = [answer_token_id(tokenizer, p, e.memorized) for p, e in zip(prompts, examples)]
    known = [i for i, t in enumerate(reference.argmax(-1).tolist()) if t == memorized[i]]
    with method.patched(model):
        agree, kl = agreement(model, tokenizer, prompts, reference)
        patched = next_token_logits(model, tokenizer, [prompts[i] for i in known]).argmax(-1).tolist() if known else []
    kept = sum(t == memorized[i] for t, i in zip(patched, known))
    return SideEffects(top1_agreement=agree, kl=kl, known=len(known),
                       known_accuracy_patched=kept / len(known) if known else float("nan"))


class EvalStore:
    """``results.json`` in the output folder: settings + one entry per finished method."""

    def __init__(self, folder: Path, settings: dict[str, Any]) -> None:
        self.path = folder / "results.json"
        folder.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {"settings": settings, "methods": [], "side_effects": None}
        if self.path.is_file():
            old = json.loads(self.path.read_text())
            # older results recorded the attribution batch size, which changes no result, and lack
            # the attribution baseline, which was the path from no context, and the dev rows'
            # formats, which were the recipe's contexts
            recipe = old.get("settings", {}).get("recipe")
            if recipe is not None:
                recipe.setdefault("dev_contexts", None)
            attribution = (recipe or {}).get("attribution")
            if attribution is not None:
                attribution.pop("internal_batch_size", None)
                attribution.setdefault("baseline", "no-context")
            if old.get("settings") == settings:
                self.data = old
            else:
                raise IrcanError(f"{self.path} was made with other settings; use another --out or delete it")

    def done(self, method: Method) -> bool:
        return any(m["method"] == method.name and m.get("seed") == method.seed for m in self.data["methods"])

    def add(self, result: MethodResult) -> None:
        self.data["methods"].append(result.model_dump())
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


def evaluate(model: Any, tokenizer: Any, examples: list[ConflictExample], methods: list[Method],
             out: Path, settings: dict[str, Any], alpha: float = 0.5, progress: bool = True) -> dict[str, Any]:
    """Run every method not yet in ``out/results.json``, then the side effects of ``ircan``."""
    from tqdm.auto import tqdm

    if not examples:
        raise IrcanError("the test split has no rows")
    store = EvalStore(out, settings)
    for method in tqdm(methods, desc="methods", disable=not progress):
        if not store.done(method):
            store.add(run_method(model, tokenizer, examples, method, alpha))
    ircan = next((m for m in methods if m.name == "ircan"), None)
    if ircan is not None and store.data["side_effects"] is None:
        store.data["side_effects"] = side_effects(model, tokenizer, examples, ircan).model_dump()
        store.save()
    return store.data


def summarize(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method name: mean (and std over seeds) of each metric; for single runs the
    95% interval and the exact McNemar test against ``original`` on the same rows."""
    from .stats import mcnemar

    rows: dict[str, list[dict[str, Any]]] = {}
    for m in data["methods"]:
        rows.setdefault(m["method"], []).append(m)
    original = rows.get("original", [None])[0]
    out = []
    for name, runs in rows.items():
        row: dict[str, Any] = {"method": name, "seeds": len(runs)}
        for metric in ("first_token", "generation", *SIDE_CHECKS):
            for field in ("accuracy", "stubbornness"):
                values = [r[metric][field] for r in runs if r.get(metric)]
                if values:
                    row[f"{metric}.{field}"] = statistics.fmean(values)
                    row[f"{metric}.{field}.std"] = statistics.pstdev(values) if len(values) > 1 else None
            one = runs[0].get(metric) if len(runs) == 1 else None
            if one and one.get("accuracy_ci"):
                row[f"{metric}.accuracy.ci"] = one["accuracy_ci"]
            base = original.get(metric) if original and name != "original" else None
            if one and base and one.get("correct") is not None and base.get("correct") is not None:
                test = mcnemar(base["correct"], one["correct"])
                row[f"{metric}.difference"], row[f"{metric}.p_value"] = test.difference, test.p_value
        out.append(row)
    return out
