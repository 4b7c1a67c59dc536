"""Predictions and the two headline metrics.

* accuracy: share of predictions equal to the context's answer;
* stubbornness: share equal to the memorized answer.

Predictions per task (IRCAN, Section 4.1):

* ``first_token`` (any task): the arg-max next token vs the first token of each answer as it
  continues the prompt;
* ``multiple_choice``: the highest logit among the option letters at the answer position;
* ``completion`` / ``qa`` generation: greedy generation (see :mod:`.decoding`), compared up to
  the first period (MemoTrap) or by containment (open QA).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import BaseModel, Field

from ..attribution import answer_token_id
from ..data import ConflictExample
from ..prompts import encode


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


@torch.no_grad()
def next_token_logits(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str],
                      batch_size: int = 16, *, all_positions: bool = False) -> torch.Tensor:
    """(N, V) next-token logits at the end of each prompt, left-padded in batches.

    Only the last position's logits are computed (``logits_to_keep=1``, as attribution does):
    the vocabulary projection of every other position is the bulk of the time and memory on long
    RAG prompts. ``all_positions=True`` computes them all and keeps the last (the benchmark's
    baseline; same numbers).
    """
    from ..attribution import _last_logits_kwargs

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    keep = {} if all_positions else _last_logits_kwargs(model)
    out = []
    for start in range(0, len(prompts), batch_size):
        ids = [encode(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)  # (B, T)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                       use_cache=False, **keep).logits[:, -1, :]  # (B, V)
        out.append(logits.float().cpu())
    return torch.cat(out)


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


def first_token_score(model: torch.nn.Module, tokenizer: Any, examples: Sequence[ConflictExample],
                      prompts: Sequence[str] | None = None) -> Score:
    """Arg-max next token vs the first tokens of the context's and the memorized answer."""
    prompts = list(prompts) if prompts is not None else [e.prompt for e in examples]
    return score_first_tokens(tokenizer, next_token_logits(model, tokenizer, prompts), prompts, examples)


def choice_score(model: torch.nn.Module, tokenizer: Any, examples: Sequence[ConflictExample],
                 prompts: Sequence[str] | None = None) -> Score:
    """Multiple choice: the option letter with the highest logit."""
    prompts = list(prompts) if prompts is not None else [e.prompt for e in examples]
    return score_choices(tokenizer, next_token_logits(model, tokenizer, prompts), prompts, examples)


def logit_score(model: torch.nn.Module, tokenizer: Any, examples: Sequence[ConflictExample],
                prompts: Sequence[str] | None = None) -> Score:
    """The cheap per-task score used for tuning: option logits for multiple choice, else first token."""
    if examples and examples[0].task == "multiple_choice":
        return choice_score(model, tokenizer, examples, prompts)
    return first_token_score(model, tokenizer, examples, prompts)


def agreement(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str],
              reference: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(reference || model)) of next-token distributions on ``prompts``.

    ``reference`` is the original model's :func:`next_token_logits` on the same prompts.
    """
    logits = next_token_logits(model, tokenizer, prompts)
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1),
                                    log_target=True, reduction="batchmean").item()
    return agree, kl


def until_period(text: str) -> str:
    """MemoTrap's prediction: the generated text up to the first period, normalized."""
    return text.split(".", 1)[0].strip().lower()
