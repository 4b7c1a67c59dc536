"""Predictions and the two headline metrics.

* accuracy: share of predictions equal to the context's answer;
* stubbornness: share equal to the memorized answer.

Predictions per task (IRCAN, Section 4.1):

* ``first_token`` (any task): the arg-max next token vs the first token of each answer as it
  continues the prompt;
* ``multiple_choice``: the highest logit among the option letters at the answer position;
* ``completion`` / ``qa`` generation: greedy generation (:mod:`ircan_serve.generation`), compared up to
  the first period (MemoTrap) or by containment (open QA).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, Field

from ..answers import answer_token_id
from ..data import ConflictExample
from ..generation import next_token_logits

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class Score(BaseModel):
    """Accuracy and stubbornness of one method on one data set, with per-row outcomes.

    ``accuracy_ci`` is the 95% Wilson interval; the per-row lists make paired tests
    (:func:`.stats.mcnemar`) against another method on the same rows possible.
    """

    accuracy: float
    stubbornness: float
    n: int
    accuracy_ci: tuple[float, float] | None = None
    correct: list[bool] | None = Field(None, repr=False)
    stubborn: list[bool] | None = Field(None, repr=False)


def score(correct: Sequence[bool], stubborn: Sequence[bool]) -> Score:
    from .stats import wilson_interval

    n = len(correct)
    k = sum(correct)
    return Score(accuracy=k / n, stubbornness=sum(stubborn) / n, n=n, accuracy_ci=wilson_interval(k, n),
                 correct=[bool(c) for c in correct], stubborn=[bool(s) for s in stubborn])


def score_first_tokens(tokenizer: Any, logits: torch.Tensor, prompts: Sequence[str],
                       examples: Sequence[ConflictExample]) -> Score:
    """Arg-max of (N, V) next-token ``logits`` vs the first tokens of the two answers."""
    top = logits.argmax(-1).tolist()
    correct = [t == answer_token_id(tokenizer, p, e.answer) for t, p, e in zip(top, prompts, examples)]
    stubborn = [t == answer_token_id(tokenizer, p, e.memorized) for t, p, e in zip(top, prompts, examples)]
    return score(correct, stubborn)


def score_choices(tokenizer: Any, logits: torch.Tensor, prompts: Sequence[str],
                  examples: Sequence[ConflictExample]) -> Score:
    """Multiple choice: the option letter whose token has the highest of the (N, V) ``logits``."""
    correct, stubborn = [], []
    for row, p, e in zip(logits, prompts, examples):
        options = e.options or [e.answer, e.memorized]
        ids = [answer_token_id(tokenizer, p, o) for o in options]
        pick = options[int(torch.stack([row[i] for i in ids]).argmax())]
        correct.append(pick == e.answer)
        stubborn.append(pick == e.memorized)
    return score(correct, stubborn)


def first_token_score(model: PreTrainedModel, tokenizer: Any, examples: Sequence[ConflictExample],
                      prompts: Sequence[str] | None = None) -> Score:
    """Arg-max next token vs the first tokens of the context's and the memorized answer."""
    prompts = list(prompts) if prompts is not None else [e.prompt for e in examples]
    return score_first_tokens(tokenizer, next_token_logits(model, tokenizer, prompts), prompts, examples)


def choice_score(model: PreTrainedModel, tokenizer: Any, examples: Sequence[ConflictExample],
                 prompts: Sequence[str] | None = None) -> Score:
    """Multiple choice: the option letter with the highest logit."""
    prompts = list(prompts) if prompts is not None else [e.prompt for e in examples]
    return score_choices(tokenizer, next_token_logits(model, tokenizer, prompts), prompts, examples)


def logit_score(model: PreTrainedModel, tokenizer: Any, examples: Sequence[ConflictExample],
                prompts: Sequence[str] | None = None) -> Score:
    """The cheap per-task score used for tuning: option logits for multiple choice, else first token."""
    if examples and examples[0].task == "multiple_choice":
        return choice_score(model, tokenizer, examples, prompts)
    return first_token_score(model, tokenizer, examples, prompts)


def agreement(model: PreTrainedModel, tokenizer: Any, prompts: Sequence[str],
              reference: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(reference || model)) of next-token distributions on ``prompts``.

    ``reference`` is the original model's :func:`next_token_logits` on the same prompts.
    """
    logits = next_token_logits(model, tokenizer, prompts)
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1),
                                    log_target=True, reduction="batchmean").item()
    return agree, kl


@dataclass(frozen=True)
class SideCheck:
    """A prompt where a weight patch must keep the original's (true) answer."""

    prompt: Callable[[ConflictExample], str | None]
    answer: Callable[[ConflictExample], str | None]
    description: str
    per_format: bool = True
    """Checked in each context format of the rows apart (False: its prompt does not depend on the
    row's context format, so it is checked once over all rows)."""


SIDE_CHECKS: dict[str, SideCheck] = {
    "locality": SideCheck(lambda e: e.locality_prompt, lambda e: e.locality_answer,
                          "an unrelated fact without context: its true answer"),
    "agreeing": SideCheck(lambda e: e.agreeing_prompt, lambda e: e.memorized,
                          "a context that states the true answer: that answer"),
    "irrelevant": SideCheck(lambda e: e.irrelevant_prompt, lambda e: e.memorized,
                            "documents about other subjects only: the memorized answer, kept", per_format=False),
}
"""Side check name -> its prompt and the answer it must keep (first token)."""


def side_scores(model: PreTrainedModel, tokenizer: Any, examples: Sequence[ConflictExample],
                names: Sequence[str] | None = None) -> dict[str, Score | None]:
    """Each of :data:`SIDE_CHECKS`' (or those ``names``) first-token scores of the model as it is,
    on the rows that have its prompt (None where none does). A weight patch must keep them all."""
    out: dict[str, Score | None] = {}
    for name in names if names is not None else list(SIDE_CHECKS):
        check = SIDE_CHECKS[name]
        rows = [e for e in examples if check.prompt(e) and check.answer(e)]
        if not rows:
            out[name] = None
            continue
        prompts = [check.prompt(e) or "" for e in rows]
        top = next_token_logits(model, tokenizer, prompts).argmax(-1).tolist()
        hits = [t == answer_token_id(tokenizer, p, check.answer(e) or "") for t, p, e in zip(top, prompts, rows)]
        out[name] = score(hits, [False] * len(hits))
    return out
