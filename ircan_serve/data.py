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
import re
import logging
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .config import DataFormat
from .errors import IrcanError
from .prompts import (  # noqa: F401  (re-exported: older code imports the templates from here)
    COMPLETION_TEMPLATE,
    MC_INSTRUCTION,
    MC_TEMPLATE,
    QA_TEMPLATE,
    PromptTemplate,
    encode,
)

log = logging.getLogger(__name__)

Task = Literal["qa", "completion", "multiple_choice"]
Renderer = Any  # (question, context | None) -> model input; see :func:`renderer`
SHIPPED_SET = "conflicts"
LETTERS = "ABCDEFGHIJ"


TEMPLATES: dict[str, PromptTemplate | None] = {
    "qa": QA_TEMPLATE,
    "multiple_choice": MC_TEMPLATE,
    "completion": None,  # MemoTrap prompts are complete sentences, not context + question
}
"""The default prompt template of each task (a recipe may give its own for qa)."""
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
    agreeing_context: str | None = Field(None, description="A context that states the memorized (true) answer.")
    agreeing_prompt: str | None = Field(
        None, description="The prompt with a context that states the memorized (true) answer: "
        "a side-effect check, where following the context must still give the true answer.")
    locality_question: str | None = Field(None, description="An unrelated fact's question (unrendered).")
    locality_prompt: str | None = Field(None, description="That question rendered without context.")
    locality_answer: str | None = Field(None, description="Its answer, as it continues the prompt.")
    source: str = Field("", description="file:line the row came from, for error messages.")


@dataclass
class LoadedData:
    """Examples read from a file, and the rows skipped with ``skip_invalid`` and why."""

    examples: list[ConflictExample]
    skipped: list[str] = field(default_factory=list)
    template: PromptTemplate | None = None
    """The prompt template the rows were rendered with (None: the format's fixed prompts)."""

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


def renderer(template: PromptTemplate, tokenizer: Any = None) -> Renderer:
    """(question, context | None) -> the model input, for ``template`` (chat mode needs the tokenizer)."""
    if template.chat and tokenizer is None:
        raise IrcanError("a chat-mode prompt template needs the model's tokenizer to render prompts")
    return lambda question, context=None: template.model_input(tokenizer, question, context)


def _agreeing_context(context: str, answer: str, memorized: str) -> str | None:
    """The context with the context's answer replaced by the memorized one (whole words), if it occurs."""
    pattern = rf"(?<!\w){re.escape(answer.strip())}(?!\w)"
    if not re.search(pattern, context, re.IGNORECASE):
        return None
    return re.sub(pattern, lambda _m: memorized.strip(), context, flags=re.IGNORECASE)


def generic_example(row: dict[str, Any], where: str, index: int,
                    template: PromptTemplate = QA_TEMPLATE, render: Renderer = None) -> ConflictExample:
    """A generic-format row (``context``, ``question``, ``answer``, ``memorized``).

    Optional: ``agreeing_context`` (a context stating the memorized answer; by default the
    context with the answer replaced, when it occurs in it), ``locality_prompt`` and
    ``locality_answer``.
    """
    _require(row, ("context", "question", "answer", "memorized"), where)
    render = render or renderer(template)
    agreeing = row.get("agreeing_context") or _agreeing_context(row["context"], str(row["answer"]),
                                                                 str(row["memorized"]))
    locality = row.get("locality_prompt")
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
        locality_question=locality if locality and row.get("locality_answer") else None,
        locality_prompt=render(locality) if locality and row.get("locality_answer") else None,
        locality_answer=template.continuation(row["locality_answer"]) if locality and row.get("locality_answer") else None,
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
                        template: PromptTemplate = COMPLETION_TEMPLATE, render: Renderer = None) -> ConflictExample:
    """A CounterFact row (EasyEdit layout): a passage stating ``target_new`` conflicts with the
    memorized ``ground_truth``; the question is the row's ``prompt`` (a sentence start)."""
    _require(row, ("prompt", "target_new", "ground_truth", "rephrase_prompt"), where)
    render = render or renderer(template)
    question = row["prompt"].strip()
    context = counterfact_context(row, row["target_new"])
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
        agreeing_context=counterfact_context(row, row["ground_truth"]),
        agreeing_prompt=render(question, counterfact_context(row, row["ground_truth"])),
        locality_question=locality if has_locality else None,
        locality_prompt=render(locality) if has_locality else None,
        locality_answer=template.continuation(row["locality_ground_truth"]) if has_locality else None,
        source=where,
    )


def memotrap_example(row: dict[str, Any], where: str, index: int, template: Any = None,
                     render: Renderer = None) -> ConflictExample:
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


def kre_example(row: dict[str, Any], where: str, index: int, template: Any = None,
                render: Renderer = None) -> ConflictExample:
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


_PARSERS = {"generic": generic_example, "memotrap": memotrap_example, "kre": kre_example,
            "counterfact": counterfact_example}
_TASKS: dict[str, Task] = {"generic": "qa", "counterfact": "qa", "memotrap": "completion",
                           "kre": "multiple_choice"}
DEFAULT_TEMPLATES = {"generic": QA_TEMPLATE, "counterfact": COMPLETION_TEMPLATE}
"""The prompt template a format uses when the recipe gives none (MemoTrap and KRE have fixed ones)."""


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
    """Guess the format from the file: a JSON list is KRE or CounterFact (rows with
    'target_new'); JSONL rows with 'classes' are MemoTrap, other JSONL generic."""
    if path.suffix == ".json":
        with path.open(encoding="utf-8") as f:
            head = f.read(4096)
        return "counterfact" if '"target_new"' in head else "kre"
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
    template: PromptTemplate | None = None,
    tokenizer: Any = None,
) -> LoadedData:
    """Read conflict examples from a file, or the shipped set when ``source == 'conflicts'``.

    ``template`` is the recipe's RAG prompt (generic and CounterFact rows; default: the format's
    own); a chat-mode template renders with ``tokenizer``'s chat template.

    Raises:
        DataError: a row is bad and ``skip_invalid`` is false, or no valid row is left.
    """
    path = shipped_conflicts_path() if str(source) == SHIPPED_SET else Path(source)
    if not path.is_file():
        raise IrcanError(f"data file {path} does not exist")
    fmt = detect_format(path) if data_format == "auto" else data_format
    if template is not None and fmt not in DEFAULT_TEMPLATES:
        raise IrcanError(f"{path}: a prompt template applies to generic and CounterFact data, not {fmt}")
    template = template or DEFAULT_TEMPLATES.get(fmt)
    render = renderer(template, tokenizer) if template is not None else None
    parser = _PARSERS[fmt]

    def parse(row: Any, where: str, index: int) -> ConflictExample:
        return parser(row, where, index, template, render)
    loaded = LoadedData(examples=[], template=template or TEMPLATES[_TASKS[fmt]])
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
        n = len(encode(tokenizer, ex.prompt + ex.answer))
        if n > max_tokens:
            msg = f"{ex.source}: prompt longer than the model's context ({n} > {max_tokens} tokens)"
            if not skip_invalid:
                raise DataError(msg)
            skipped.append(msg)
            continue
        kept.append(ex)
    if not kept:
        raise DataError("no example fits in the model's context")
    return LoadedData(examples=kept, skipped=skipped, template=loaded.template)


def split_examples(
    examples: list[ConflictExample], dev_fraction: float = 0.5
) -> tuple[list[ConflictExample], list[ConflictExample]]:
    """Deterministic (attribution, held-out) split: the first ``dev_fraction`` of the rows, and the rest."""
    if not 0 < dev_fraction < 1:
        raise IrcanError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
    n_first = round(len(examples) * dev_fraction)
    return examples[:n_first], examples[n_first:]
