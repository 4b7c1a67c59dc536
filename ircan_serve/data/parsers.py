"""One row of each data format -> a :class:`~.example.ConflictExample` (or a :class:`DataError`
that names the file, the line and the problem)."""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from typing import Any

from ..answers import replace_answer
from ..errors import IrcanError
from ..prompts import COMPLETION_TEMPLATE, MC_TEMPLATE, QA_TEMPLATE, PromptTemplate
from .example import ConflictExample, DataError

Renderer = Callable[..., str]
"""(question, context=None) -> the model input."""
Parser = Callable[[dict[str, Any], str, int, Any, Any], ConflictExample]
"""(row, where, index, template, render) -> example."""

LETTERS = "ABCDEFGHIJ"


def renderer(template: PromptTemplate, tokenizer: Any = None) -> Renderer:
    """(question, context | None) -> the model input, for ``template`` (chat mode needs the tokenizer)."""
    if template.chat and tokenizer is None:
        raise IrcanError("a chat-mode prompt template needs the model's tokenizer to render prompts")
    return lambda question, context=None: template.model_input(tokenizer, question, context)


def require(row: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    """Every key of ``keys`` is in ``row`` and not empty."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in keys:
        if key not in row:
            raise DataError(f"{where}: missing field {key!r}")
        value = row[key]
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{where}: empty field {key!r}")


def generic_example(row: dict[str, Any], where: str, index: int,
                    template: PromptTemplate = QA_TEMPLATE, render: Renderer | None = None) -> ConflictExample:
    """A generic-format row (``context``, ``question``, ``answer``, ``memorized``).

    Optional: ``agreeing_context`` (a context stating the memorized answer; by default the
    context with the answer replaced, when it occurs in it), ``locality_prompt`` and
    ``locality_answer``.
    """
    require(row, ("context", "question", "answer", "memorized"), where)
    render = render or renderer(template)
    agreeing = row.get("agreeing_context") or replace_answer(row["context"], str(row["answer"]), str(row["memorized"]))
    locality = row.get("locality_prompt") if row.get("locality_answer") else None
    return ConflictExample(
        id=str(row.get("id", f"row-{index}")),
        task="qa",
        prompt=render(row["question"], row["context"]),
        prompt_without_context=render(row["question"]),
        answer=template.continuation(row["answer"]),
        memorized=template.continuation(row["memorized"]),
        context=row["context"],
        question=row["question"],
        agreeing_context=agreeing,
        agreeing_prompt=render(row["question"], agreeing) if agreeing else None,
        locality_question=locality,
        locality_prompt=render(locality) if locality else None,
        locality_answer=template.continuation(row["locality_answer"]) if locality else None,
        source=where,
    )


def _statement_start(rephrase: str) -> str:
    """A CounterFact paraphrase prompt without its junk lead-in ("and Sallie Riley. X is located in")."""
    parts = re.split(r"(?<=[.!?])\s+", rephrase.strip())
    return parts[-1] if parts[-1] else rephrase.strip()


def counterfact_context(row: dict[str, Any], answer: str) -> str:
    """The evidence sentence stating ``answer`` for a CounterFact row: its paraphrase prompt,
    completed ("Michel Denisot's mother tongue is Russian."). The paraphrase, not the prompt
    itself, so that the question is not answered by copying the context word for word."""
    return f"{_statement_start(row['rephrase_prompt'])} {answer.strip()}."


def counterfact_example(row: dict[str, Any], where: str, index: int,
                        template: PromptTemplate = COMPLETION_TEMPLATE,
                        render: Renderer | None = None) -> ConflictExample:
    """A CounterFact row (EasyEdit layout): a passage stating ``target_new`` conflicts with the
    memorized ``ground_truth``; the question is the row's ``prompt`` (a sentence start)."""
    require(row, ("prompt", "target_new", "ground_truth", "rephrase_prompt"), where)
    render = render or renderer(template)
    question = row["prompt"].strip()
    context = counterfact_context(row, row["target_new"])
    agreeing = counterfact_context(row, row["ground_truth"])
    locality = (row.get("locality_prompt") or "").strip()
    has_locality = bool(locality and str(row.get("locality_ground_truth") or "").strip())
    return ConflictExample(
        id=str(row.get("case_id", row.get("id", f"row-{index}"))),
        task="qa",
        prompt=render(question, context),
        prompt_without_context=render(question),
        answer=template.continuation(row["target_new"]),
        memorized=template.continuation(row["ground_truth"]),
        context=context,
        question=question,
        agreeing_context=agreeing,
        agreeing_prompt=render(question, agreeing),
        locality_question=locality if has_locality else None,
        locality_prompt=render(locality) if has_locality else None,
        locality_answer=template.continuation(row["locality_ground_truth"]) if has_locality else None,
        source=where,
        subject=str(row.get("subject") or "").strip() or None,
        statements=[_statement_start(row["rephrase_prompt"])],
    )


def _memotrap_classes(row: dict[str, Any], where: str) -> tuple[str, str]:
    """(answer, memorized) of a MemoTrap row."""
    try:
        classes = ast.literal_eval(row["classes"]) if isinstance(row["classes"], str) else row["classes"]
    except (ValueError, SyntaxError) as e:
        raise DataError(f"{where}: field 'classes' is not a list literal: {e}") from e
    if not isinstance(classes, list) or len(classes) != 2:
        raise DataError(f"{where}: field 'classes' must hold two answers, got {classes!r}")
    idx = row["answer_index"]
    if idx not in (0, 1):
        raise DataError(f"{where}: field 'answer_index' must be 0 or 1, got {idx!r}")
    answer, memorized = str(classes[idx]), str(classes[1 - idx])
    for name, value in (("answer", answer), ("memorized answer", memorized)):
        if not value.strip():
            raise DataError(f"{where}: empty {name} in 'classes'")
    return answer, memorized


def memotrap_example(row: dict[str, Any], where: str, index: int, template: PromptTemplate | None = None,
                     render: Renderer | None = None) -> ConflictExample:
    """A MemoTrap row: the instruction before the first ': ' is the context."""
    require(row, ("prompt", "classes", "answer_index"), where)
    answer, memorized = _memotrap_classes(row, where)
    instruction, sep, quote = row["prompt"].partition(": ")
    if not sep or not quote.strip():
        raise DataError(f"{where}: prompt has no 'instruction: quote' form")
    return ConflictExample(
        id=str(row.get("id", f"row-{index}")),
        task="completion",
        prompt=row["prompt"],
        prompt_without_context=quote,
        answer=answer if answer.startswith(" ") else " " + answer,
        memorized=memorized if memorized.startswith(" ") else " " + memorized,
        context=instruction,
        question=quote,
        source=where,
    )


def kre_example(row: dict[str, Any], where: str, index: int, template: PromptTemplate | None = None,
                render: Renderer | None = None) -> ConflictExample:
    """A KRE row: a multiple-choice question whose ``negative_context`` argues for ``candidate``."""
    require(row, ("question", "choices", "negative_context", "candidate", "answer"), where)
    choices = row["choices"]
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        raise DataError(f"{where}: field 'choices' must be a list of 2 to {len(LETTERS)} options")
    letters = list(LETTERS[: len(choices)])
    for key in ("candidate", "answer"):
        if row[key] not in letters:
            raise DataError(f"{where}: field {key!r} = {row[key]!r} is not one of {letters}")
    question = row["question"].strip() + "\n" + "\n".join(
        f"{letter}. {choice}" for letter, choice in zip(letters, choices)
    )
    return ConflictExample(
        id=str(row.get("id", f"row-{index}")),
        task="multiple_choice",
        prompt=MC_TEMPLATE.render(question, row["negative_context"].strip()),
        prompt_without_context=MC_TEMPLATE.render(question),
        answer=" " + row["candidate"],
        memorized=" " + row["answer"],
        options=[" " + letter for letter in letters],
        context=row["negative_context"].strip(),
        question=question,
        source=where,
    )
