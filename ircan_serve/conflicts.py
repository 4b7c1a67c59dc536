"""Conflicts for *this* model: the known-facts filter, and conflict sets built from QA pairs.

A counterfactual context is a knowledge conflict only where the model memorized the fact it
contradicts. :func:`known_facts` keeps the rows whose memorized answer the model itself gives
without context (greedy generation, whole-word match, as the served endpoint is judged).
:func:`build_conflicts` (``ircan conflicts``) turns a user's own QA pairs into a conflict set in
the generic JSONL every loader reads: ask the model closed-book, keep the rows it answers, and
swap in another answer of the same kind, in the user's passage or in a one-sentence context.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from .answers import answer_matches, replace_answer
from .data import ConflictExample, DataError, read_rows, renderer
from .errors import IrcanError
from .files import atomic_write, atomic_write_json
from .generation import greedy_generate
from .prompts import QA_TEMPLATE, PromptTemplate

log = logging.getLogger(__name__)

KNOWN_TOKENS = 5
"""Tokens generated without context to decide whether the model knows a fact."""


class KnownReport(BaseModel):
    """What the known-facts filter kept."""

    checked: int
    kept_ids: list[str]
    max_new_tokens: int = KNOWN_TOKENS

    @property
    def kept(self) -> int:
        return len(self.kept_ids)


def known_facts(model: Any, tokenizer: Any, examples: Sequence[ConflictExample], *,
                max_new_tokens: int = KNOWN_TOKENS, batch_size: int = 64, progress: bool = True,
                source: str = "the data") -> tuple[list[ConflictExample], KnownReport]:
    """The examples whose memorized answer the model generates for the prompt without context.

    Raises:
        IrcanError: no row is known (naming ``source``): there is no conflict for this model.
    """
    from tqdm.auto import tqdm

    kept: list[ConflictExample] = []
    bar = tqdm(total=len(examples), desc="known-facts filter", unit="row", disable=not progress)
    with bar:
        for start in range(0, len(examples), batch_size):
            batch = list(examples[start : start + batch_size])
            texts = greedy_generate(model, tokenizer, [e.prompt_without_context for e in batch],
                                    max_new_tokens, batch_size=batch_size)
            kept += [e for e, t in zip(batch, texts) if answer_matches(t, e.memorized)]
            bar.update(len(batch))
    report = KnownReport(checked=len(examples), kept_ids=[e.id for e in kept], max_new_tokens=max_new_tokens)
    if not kept:
        raise IrcanError(f"{source}: the known-facts filter kept none of {len(examples)} rows: the model "
                         "gives none of the memorized answers without context, so no row is a conflict for it")
    log.info("known-facts filter: kept %d of %d rows", len(kept), len(examples))
    return kept, report


# --------------------------------------------------------------------------- ircan conflicts


class QAPair(BaseModel):
    """One row of a user's QA file (JSONL): ``question``, ``answer``, optional ``passage``/``kind``."""

    id: str
    question: str
    answer: str
    passage: str | None = None
    kind: str | None = Field(None, description="Answers are swapped only within a kind.")


class ConflictReport(BaseModel):
    """What ``ircan conflicts`` wrote and what it dropped, with reasons."""

    input: str
    output: str
    rows: int
    written: int
    dropped: dict[str, int]
    dropped_rows: list[str] = Field(description="'id: reason' for every dropped row.")


def answer_kind(question: str, answer: str) -> str:
    """A coarse kind for rows without ``kind``: the shape of the answer and the question's wh-phrase.

    Years swap with years, numbers with numbers, names with names, for questions that start alike
    ("which country", "who", "what year"), so a substitute is plausible.
    """
    a = answer.strip()
    if re.fullmatch(r"1\d{3}|20\d{2}", a):
        shape = "year"
    elif re.fullmatch(r"[\d.,]+", a):
        shape = "number"
    elif a[:1].isupper():
        shape = "name"
    else:
        shape = "word"
    words = re.findall(r"[a-z]+", question.lower())
    wh = next((i for i, w in enumerate(words) if w in {"who", "what", "which", "where", "when", "how"}), None)
    lead = " ".join(words[wh : wh + 2]) if wh is not None else ""
    return f"{shape}|{lead}"


def _read_pairs(path: Path) -> tuple[list[QAPair], list[str]]:
    pairs, bad = [], []
    for index, (where, row) in enumerate(read_rows(path)):
        if isinstance(row, DataError):
            bad.append(f"{where}: {row}")
            continue
        if not isinstance(row, dict) or not str(row.get("question", "")).strip() or not str(row.get("answer", "")).strip():
            bad.append(f"{where}: needs non-empty 'question' and 'answer'")
            continue
        pairs.append(QAPair(id=str(row.get("id", f"row-{index}")), question=str(row["question"]).strip(),
                            answer=str(row["answer"]).strip(), passage=row.get("passage") or None,
                            kind=row.get("kind") or None))
    return pairs, bad


def one_sentence_context(question: str, answer: str) -> str:
    """A context for a pair without a passage: one sentence that states ``answer``."""
    return f'The answer to "{question.strip()}" is {answer.strip()}.'


def build_conflicts(model: Any, tokenizer: Any, source: str | Path, output: str | Path, *,
                    template: PromptTemplate = QA_TEMPLATE, seed: int = 0,
                    max_new_tokens: int = 10, progress: bool = True) -> ConflictReport:
    """Write a conflict set (generic JSONL) from QA pairs the model answers closed-book.

    Each kept row's context states a substitute answer of the same kind (from another row): the
    row's passage with the answer replaced, or :func:`one_sentence_context`. ``answer`` is the
    substitute (what the context says), ``memorized`` the original answer.
    """
    source, output = Path(source), Path(output)
    if not source.is_file():
        raise IrcanError(f"QA file {source} does not exist")
    pairs, bad = _read_pairs(source)
    dropped: list[str] = list(bad)
    if not pairs:
        raise IrcanError(f"{source}: no usable QA pairs ({len(bad)} bad rows)")
    render = renderer(template, tokenizer)
    texts = greedy_generate(model, tokenizer, [render(p.question) for p in pairs], max_new_tokens)
    answered = []
    for p, t in zip(pairs, texts):
        if answer_matches(t, p.answer):
            answered.append(p)
        else:
            dropped.append(f"{p.id}: the model does not answer it closed-book (said {t.strip()[:40]!r})")
    by_kind: dict[str, list[QAPair]] = defaultdict(list)
    for p in answered:
        by_kind[p.kind or answer_kind(p.question, p.answer)].append(p)
    rng = random.Random(seed)
    rows = []
    for p in answered:
        kind = p.kind or answer_kind(p.question, p.answer)
        others = sorted({o.answer for o in by_kind[kind] if o.answer.lower() != p.answer.lower()})
        if not others:
            dropped.append(f"{p.id}: no other answer of the same kind ({kind})")
            continue
        new = rng.choice(others)
        if p.passage:
            replaced = replace_answer(p.passage, p.answer, new)
            if replaced is None:
                dropped.append(f"{p.id}: the passage does not state the answer")
                continue
            context, agreeing = replaced, p.passage
        else:
            context, agreeing = one_sentence_context(p.question, new), one_sentence_context(p.question, p.answer)
        rows.append({"id": p.id, "context": context, "question": p.question, "answer": new,
                     "memorized": p.answer, "agreeing_context": agreeing})
    if not rows:
        raise IrcanError(f"{source}: no conflict could be built; dropped: {_reasons(dropped)}")
    atomic_write(output, "".join(json.dumps(r) + "\n" for r in rows))
    report = ConflictReport(input=str(source), output=str(output), rows=len(pairs) + len(bad),
                            written=len(rows), dropped=_reasons(dropped), dropped_rows=dropped)
    atomic_write_json(output.with_name(output.stem + ".report.json"), report.model_dump(mode="json"))
    return report


def _reasons(dropped: list[str]) -> dict[str, int]:
    return dict(Counter(re.sub(r" \(.*\)$", "", d.split(": ", 1)[-1]) for d in dropped))


def write_known_rows(model: Any, tokenizer: Any, source: str | Path, output: str | Path, *,
                     data_format: str = "auto", progress: bool = True) -> KnownReport:
    """Write the rows of ``source`` whose memorized answer the model gives without context (the
    known-facts filter), unchanged and in file order, in the same format: a data file of conflicts
    for this model, cheaper to ship and reload than the filter is to rerun."""
    from .data import data_path, load_examples

    path = data_path(source)
    loaded = load_examples(path, data_format, skip_invalid=True, tokenizer=tokenizer)
    kept, report = known_facts(model, tokenizer, loaded.examples, progress=progress, source=str(source))
    wanted = {e.source for e in kept}
    rows = [row for where, row in read_rows(path) if where in wanted]
    if path.suffix == ".json":
        atomic_write(output, json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    else:
        atomic_write(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return report
