"""Contexts of several shapes, built from the same conflict rows: the context format table.

A RAG deployment rarely retrieves the one sentence that states the answer. These builders put a
row's fact into the shapes users retrieve, so attribution, tuning, evaluation and the demo can
each be asked for any of them:

* ``sentence``: the row's own context (CounterFact: one paraphrase ending in the answer);
* ``passage-prose``, ``passage-list``, ``passage-qa``, ``passage-bullets``: multi-sentence evidence
  of 50 to 130 words in four styles (a paragraph, a numbered list of claims, question-and-answer
  notes, a fact sheet of bullets whose claims are worded from a second template bank, so a list
  style tuning on ``passage-list`` never saw): several claims that support the answer, the answer
  inside sentences rather than at their end, and distractor claims about other subjects;
* ``topk``: the top k documents a retriever returns for the question from all rows' sentences
  (the relevant one among its nearest neighbours, or not at all);
* ``irrelevant``: the nearest documents about *other* subjects only, as a retriever returns them
  when the corpus lacks the answer: the model should keep its memorized answer.

Built rows keep their id with ``@FORMAT`` appended, so one store can hold a mix. Passages are
made from the row's statements (CounterFact's prompt and paraphrase) with seeded choices, so the
same rows give the same passages on every machine.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..answers import replace_answer
from ..errors import IrcanError, table_entry
from .example import ConflictExample

SUPPORT = [  # a claim with the answer inside it: {s} a statement start, {a} the answer, {subj} the subject
    "{S} {a}, as several reference works note.",
    "According to the sources collected here, {s} {a}, and none of them says otherwise.",
    "{A} is what the records give: {s} {a}.",
    "It is well documented that {s} {a}, a detail often repeated in profiles of {subj}.",
    "Most accounts agree on {a} when they describe {subj}.",
    "{S} {a}; this is the version given in the main biographies and databases.",
    "Asked about {subj}, specialists point to {a} first.",
]
SHEET = [  # the fact sheet's claims: worded apart from SUPPORT, the answer inside each
    "{S} {a}, in the standard references on the topic.",
    "Sources consistently list {a} for {subj}, without exception.",
    "{A} comes up again and again in accounts of {subj}.",
    "Records confirm that {s} {a}, and no dispute about it is recorded.",
    "{S} {a}, which later writers simply repeat.",
    "Encyclopedias name {a} in this connection, as do the archives.",
]
NEUTRAL = [  # about the subject, without the answer
    "{subj} is discussed in many reference works.",
    "Several articles have been written about {subj} over the years.",
    "The entry on {subj} was last revised recently.",
    "Little else about {subj} is disputed among the sources.",
]


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _claims(e: ConflictExample, rng: random.Random, n: int, bank: Sequence[str] = SUPPORT) -> list[str]:
    """``n`` claims that state the context's answer, each with it inside the sentence (templates: ``bank``)."""
    answer = e.answer.strip()
    subject = e.subject or (e.question or "it")
    starts = e.statements or [e.question or ""]
    out = []
    for template in rng.sample(list(bank), n):
        start = rng.choice(starts).strip()
        lower = start[:1].lower() + start[1:] if start.startswith(("The ", "A ", "An ")) else start
        out.append(template.format(s=lower, S=_capital(start), a=answer, A=_capital(answer), subj=subject))
    return out


def _distractors(pool: Sequence[ConflictExample], e: ConflictExample, rng: random.Random, n: int) -> list[str]:
    """``n`` one-sentence facts about other subjects (their own contexts)."""
    others = [o for o in pool if o.id != e.id and o.context and o.subject != e.subject]
    return [o.context or "" for o in rng.sample(others, min(n, len(others)))]


@dataclass
class ContextPool:
    """What builders draw on besides the row: the other rows, and a retriever over their sentences."""

    rows: Sequence[ConflictExample]
    k: int = 4
    _search: Any = field(default=None, repr=False)

    def nearest(self, e: ConflictExample, k: int, exclude_own: bool) -> list[ConflictExample]:
        """The ``k`` rows whose sentence context is nearest to ``e``'s question (MiniLM embeddings);
        with ``exclude_own``, neither ``e``'s row nor another row about its subject."""
        if self._search is None:
            from ..retrieval import conflict_documents, embed_index

            self._search = embed_index(conflict_documents(self.rows))
        by_id = {r.id: r for r in self.rows}
        skip = {r.id for r in self.rows if r.id == e.id or (e.subject and r.subject == e.subject)} if exclude_own else set()
        ranked = [by_id[i] for i in self._search(e.question or "", k + len(skip) + 1) if i in by_id]
        return [r for r in ranked if r.id not in skip][:k]


def _seed(e: ConflictExample, name: str) -> random.Random:
    return random.Random(zlib.crc32(f"{e.id}/{name}".encode()))


def _prose(e: ConflictExample, pool: ContextPool) -> str:
    rng = _seed(e, "prose")
    subject = e.subject or "the subject"
    parts = [rng.choice(NEUTRAL).format(subj=subject), *_claims(e, rng, 3), *_distractors(pool.rows, e, rng, 2),
             rng.choice(NEUTRAL).format(subj=subject)]
    head, middle, tail = parts[0], parts[1:-1], parts[-1]
    rng.shuffle(middle)
    return " ".join([head, *middle, tail])


def _numbered(e: ConflictExample, pool: ContextPool) -> str:
    rng = _seed(e, "list")
    items = [*_claims(e, rng, 3), *_distractors(pool.rows, e, rng, 1)]  # with the closing line: 5 items
    rng.shuffle(items)
    items.append(rng.choice(NEUTRAL).format(subj=e.subject or "the subject"))
    return "\n".join(f"{i}. {claim}" for i, claim in enumerate(items, 1))


def _qa_notes(e: ConflictExample, pool: ContextPool) -> str:
    rng = _seed(e, "qa")
    subject = e.subject or "the subject"
    claims = _claims(e, rng, 3)
    other = _distractors(pool.rows, e, rng, 1)
    lines = [f"Q: What do the sources say about {subject}? A: {claims[0]}",
             f"Q: Is there another account? A: {claims[1]}",
             f"Q: Do the databases agree? A: {claims[2]}",
             *(f"Q: And elsewhere? A: {d}" for d in other),
             f"Q: Anything else? A: {rng.choice(NEUTRAL).format(subj=subject)}"]
    return "\n".join(lines)


def _fact_sheet(e: ConflictExample, pool: ContextPool) -> str:
    rng = _seed(e, "sheet")
    subject = e.subject or "the subject"
    items = [*_claims(e, rng, 4, SHEET), *_distractors(pool.rows, e, rng, 1)]
    rng.shuffle(items)
    items.append(rng.choice(NEUTRAL).format(subj=subject))  # as the list: never another subject's answer last
    return "\n".join([f"Key facts about {subject}:", *(f"- {item}" for item in items)])


def _topk(e: ConflictExample, pool: ContextPool) -> str:
    return " ".join(r.context or "" for r in pool.nearest(e, pool.k, exclude_own=False))


def _irrelevant(e: ConflictExample, pool: ContextPool) -> str:
    return " ".join(r.context or "" for r in pool.nearest(e, pool.k, exclude_own=True))


@dataclass(frozen=True)
class ContextFormat:
    build: Callable[[ConflictExample, ContextPool], str]
    description: str
    relevant: bool = True
    """The context states the row's answer (False: ``irrelevant``, which does not)."""


CONTEXTS: dict[str, ContextFormat] = {
    "sentence": ContextFormat(lambda e, _pool: e.context or "", "the row's own context"),
    "passage-prose": ContextFormat(_prose, "a paragraph: claims for the answer among distractors"),
    "passage-list": ContextFormat(_numbered, "a numbered list of claims, one of them about another subject"),
    "passage-qa": ContextFormat(_qa_notes, "question-and-answer notes"),
    "passage-bullets": ContextFormat(_fact_sheet, "a fact sheet of bullets, its claims worded apart from the others'"),
    "topk": ContextFormat(_topk, "the retriever's top k documents for the question"),
    "irrelevant": ContextFormat(_irrelevant, "the nearest documents about other subjects only", relevant=False),
}
"""Context format name -> how a row's context is built."""


def context_format(name: str) -> ContextFormat:
    return table_entry(CONTEXTS, name, "context format", "ircan_serve/data/contexts.py:CONTEXTS")


def format_of(e: ConflictExample) -> str:
    """The context format a row was built in (``sentence`` for a row as loaded)."""
    return e.id.rpartition("@")[2] if "@" in e.id else "sentence"


def in_context(e: ConflictExample, name: str, pool: ContextPool, render: Callable[..., str]) -> ConflictExample:
    """``e`` with its context rebuilt in format ``name`` (prompts rendered again with ``render``)."""
    if name == "sentence":
        return e
    if not e.question or e.context is None:
        raise IrcanError(f"{e.source}: context format {name!r} needs a row with a context and a question")
    context = context_format(name).build(e, pool)
    agreeing = replace_answer(context, e.answer, e.memorized) if context_format(name).relevant else None
    return e.model_copy(update={
        "id": f"{e.id}@{name}", "context": context, "prompt": render(e.question, context),
        "agreeing_context": agreeing, "agreeing_prompt": render(e.question, agreeing) if agreeing else None})


def mixed(rows: Sequence[ConflictExample], names: Sequence[str], pool: ContextPool,
          render: Callable[..., str]) -> list[ConflictExample]:
    """Each row in one of ``names``, in turn (row i in ``names[i % len(names)]``): a mix that costs
    what the rows alone cost."""
    for name in names:
        context_format(name)
    return [with_irrelevant(in_context(e, names[i % len(names)], pool, render), e, pool, render)
            for i, e in enumerate(rows)]


def with_irrelevant(built: ConflictExample, e: ConflictExample, pool: ContextPool,
                    render: Callable[..., str]) -> ConflictExample:
    """``built`` (``e`` in some format) with its ``irrelevant_prompt``: ``e``'s question after the
    nearest documents about other subjects, the side check where the model keeps its answer."""
    if not e.question:
        return built
    return built.model_copy(update={"irrelevant_prompt": render(e.question, _irrelevant(e, pool))})
