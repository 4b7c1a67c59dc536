"""Knowledge-conflict examples: the schema, the loaders and the checks on each row.

Three input formats are read into one :class:`ConflictExample`:

* **generic JSONL** (the project's own format, also the shipped set): one object per line with
  ``context``, ``question``, ``answer`` (what the context says) and ``memorized`` (what the model
  believes), and an optional ``id``. Prompts use :data:`QA_TEMPLATE`.
* **MemoTrap JSONL**: ``prompt`` = instruction + ``": "`` + quote start, ``classes`` (the string
  repr of a two-item list), ``answer_index`` (the class the instruction demands). The instruction
  is the context; the prompt without context is the bare quote start.
* **KRE JSON** (COSE_KRE, ECARE_KRE): a list of objects with ``question``, ``choices``,
  ``negative_context`` (the context to follow), ``candidate`` (the context's letter) and
  ``answer`` (the memorized letter). Prompts use :data:`MC_TEMPLATE`.
"""

from __future__ import annotations

import ast
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .config import DataFormat
from .errors import IrcanError

log = logging.getLogger(__name__)

Task = Literal["qa", "completion", "multiple_choice"]
SHIPPED_SET = "conflicts"
LETTERS = "ABCDEFGHIJ"


class PromptTemplate(BaseModel):
    """How a context and a question become a prompt; stored in the export manifest."""

    model_config = ConfigDict(frozen=True)
    with_context: str = Field(description="Format string with {context} and {question}.")
    without_context: str = Field(description="Format string with {question}.")

    def render(self, question: str, context: str | None = None) -> str:
        """The prompt for ``question``, with ``context`` when one is given."""
        if context is None:
            return self.without_context.format(question=question)
        return self.with_context.format(context=context, question=question)


QA_TEMPLATE = PromptTemplate(
    with_context="Context: {context}\nQuestion: {question}\nAnswer:",
    without_context="Question: {question}\nAnswer:",
)
MC_INSTRUCTION = "Choose the correct option to answer the following question:"
MC_TEMPLATE = PromptTemplate(
    with_context=MC_INSTRUCTION + "\n{context}\n{question}\nAnswer:",
    without_context=MC_INSTRUCTION + "\n{question}\nAnswer:",
)

TEMPLATES: dict[str, PromptTemplate | None] = {
    "qa": QA_TEMPLATE,
    "multiple_choice": MC_TEMPLATE,
    "completion": None,  # MemoTrap prompts are complete sentences, not context + question
}
"""The prompt template of each task, recorded in the export manifest for the RAG wrapper."""


class ConflictExample(BaseModel):
    """One knowledge conflict: a context that contradicts what the model memorized."""

    model_config = ConfigDict(frozen=True)
    id: str = Field(description="Stable identifier (the attribution store is keyed by it).")
    task: Task
    prompt: str = Field(description="The prompt with the context.")
    prompt_without_context: str = Field(description="The same prompt without the context.")
    answer: str = Field(description="The context's answer, as it continues the prompt (' Lyon').")
    memorized: str = Field(description="The memorized answer, as it continues the prompt.")
    options: list[str] | None = Field(None, description="Option letters for multiple choice.")
    context: str | None = None
    question: str | None = None
    source: str = Field("", description="file:line the row came from, for error messages.")


@dataclass
class LoadedData:
    """Examples read from a file, and the rows skipped with ``skip_invalid`` and why."""

    examples: list[ConflictExample]
    skipped: list[str] = field(default_factory=list)

    def skip_summary(self) -> str:
        """'skipped 3 rows: 2 missing field ..., 1 empty answer' (empty when none)."""
        if not self.skipped:
            return ""
        reasons = Counter(s.split(": ", 1)[-1].split(" (")[0] for s in self.skipped)
        parts = ", ".join(f"{n} {r}" for r, n in reasons.most_common())
        return f"skipped {len(self.skipped)} invalid rows: {parts}"


class DataError(IrcanError):
    """A bad data row; the message names the file, the line and the problem."""


def _continuation(text: str) -> str:
    text = str(text).strip()
    return " " + text if text else ""


def _require(row: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in keys:
        if key not in row:
            raise DataError(f"{where}: missing field {key!r}")
        value = row[key]
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{where}: empty field {key!r}")


def generic_example(row: dict[str, Any], where: str, index: int) -> ConflictExample:
    """A generic-format row (``context``, ``question``, ``answer``, ``memorized``)."""
    _require(row, ("context", "question", "answer", "memorized"), where)
    return ConflictExample(
        id=str(row.get("id", f"row-{index}")),
        task="qa",
        prompt=QA_TEMPLATE.render(row["question"], row["context"]),
        prompt_without_context=QA_TEMPLATE.render(row["question"]),
        answer=_continuation(row["answer"]),
        memorized=_continuation(row["memorized"]),
        context=row["context"],
        question=row["question"],
        source=where,
    )


def memotrap_example(row: dict[str, Any], where: str, index: int) -> ConflictExample:
    """A MemoTrap row: the instruction before the first ': ' is the context."""
    _require(row, ("prompt", "classes", "answer_index"), where)
    try:
        classes = ast.literal_eval(row["classes"]) if isinstance(row["classes"], str) else row["classes"]
    except (ValueError, SyntaxError) as e:
        raise DataError(f"{where}: field 'classes' is not a list literal: {e}") from e
    if not isinstance(classes, list) or len(classes) != 2:
        raise DataError(f"{where}: field 'classes' must hold two answers, got {classes!r}")
    idx = row["answer_index"]
    if idx not in (0, 1):
        raise DataError(f"{where}: field 'answer_index' must be 0 or 1, got {idx!r}")
    instruction, sep, quote = row["prompt"].partition(": ")
    if not sep or not quote.strip():
        raise DataError(f"{where}: prompt has no 'instruction: quote' form")
    answer, memorized = str(classes[idx]), str(classes[1 - idx])
    for name, value in (("answer", answer), ("memorized answer", memorized)):
        if not value.strip():
            raise DataError(f"{where}: empty {name} in 'classes'")
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


def kre_example(row: dict[str, Any], where: str, index: int) -> ConflictExample:
    """A KRE row: a five-option question whose ``negative_context`` argues for ``candidate``."""
    _require(row, ("question", "choices", "negative_context", "candidate", "answer"), where)
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


_PARSERS = {"generic": generic_example, "memotrap": memotrap_example, "kre": kre_example}


def _read_rows(path: Path) -> list[tuple[str, Any]]:
    """(location, row) pairs; JSON lists are located by item, JSONL by line."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from e
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of rows")
        return [(f"{path}: item {i}", row) for i, row in enumerate(rows)]
    out: list[tuple[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((f"{path}:{lineno}", DataError(f"{path}:{lineno}: not valid JSON: {e.msg}")))
    return out


def detect_format(path: Path) -> DataFormat:
    """Guess the format from the file: a JSON list is KRE; JSONL rows with 'classes' MemoTrap."""
    if path.suffix == ".json":
        return "kre"
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    break
                return "memotrap" if isinstance(first, dict) and "classes" in first else "generic"
    return "generic"


def shipped_conflicts_path() -> Path:
    """The hand-written counterfactual QA set that ships with the package."""
    return Path(str(resources.files("ircan_serve") / "datasets" / "conflicts.jsonl"))


def load_examples(
    source: str | Path,
    data_format: DataFormat = "auto",
    *,
    skip_invalid: bool = False,
    limit: int | None = None,
) -> LoadedData:
    """Read conflict examples from a file, or the shipped set when ``source == 'conflicts'``.

    Raises:
        DataError: a row is bad and ``skip_invalid`` is false, or no valid row is left.
    """
    path = shipped_conflicts_path() if str(source) == SHIPPED_SET else Path(source)
    if not path.is_file():
        raise IrcanError(f"data file {path} does not exist")
    fmt = detect_format(path) if data_format == "auto" else data_format
    parse = _PARSERS[fmt]
    loaded = LoadedData(examples=[])
    seen: set[str] = set()
    for index, (where, row) in enumerate(_read_rows(path)):
        if limit is not None and len(loaded.examples) >= limit:
            break
        try:
            if isinstance(row, DataError):
                raise row
            example = parse(row, where, index)
            if example.id in seen:
                raise DataError(f"{where}: duplicate id {example.id!r}")
            if example.answer.strip() == example.memorized.strip():
                raise DataError(f"{where}: answer equals the memorized answer")
        except DataError as e:
            if not skip_invalid:
                raise
            loaded.skipped.append(str(e))
            continue
        seen.add(example.id)
        loaded.examples.append(example)
    if not loaded.examples:
        raise DataError(f"{path}: no valid rows (format {fmt})")
    if loaded.skipped:
        log.warning("%s: %s", path, loaded.skip_summary())
    return loaded


def check_prompt_lengths(
    loaded: LoadedData, tokenizer: Any, max_tokens: int, *, skip_invalid: bool = False
) -> LoadedData:
    """Reject (or, with ``skip_invalid``, drop) examples whose prompt exceeds ``max_tokens``."""
    kept: list[ConflictExample] = []
    skipped = list(loaded.skipped)
    for ex in loaded.examples:
        n = len(tokenizer(ex.prompt + ex.answer)["input_ids"])
        if n > max_tokens:
            msg = f"{ex.source}: prompt longer than the model's context ({n} > {max_tokens} tokens)"
            if not skip_invalid:
                raise DataError(msg)
            skipped.append(msg)
            continue
        kept.append(ex)
    if not kept:
        raise DataError("no example fits in the model's context")
    return LoadedData(examples=kept, skipped=skipped)


def split_examples(
    examples: list[ConflictExample], dev_fraction: float = 0.5
) -> tuple[list[ConflictExample], list[ConflictExample]]:
    """Deterministic (attribution, held-out) split: the first ``dev_fraction`` of the rows, and the rest."""
    if not 0 < dev_fraction < 1:
        raise IrcanError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
    n_first = round(len(examples) * dev_fraction)
    return examples[:n_first], examples[n_first:]
