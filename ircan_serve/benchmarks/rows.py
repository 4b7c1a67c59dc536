"""The rows the benchmarks time: shipped conflicts padded to a prompt length, or a data file's first rows."""

from __future__ import annotations

from typing import Any

from ..answers import replace_answer
from ..data import ConflictExample, load_examples
from ..prompts import QA_TEMPLATE


def _padded_context(tokenizer: Any, e: ConflictExample, facts: list[str], n_tokens: int, start: int, step: int) -> str:
    context, j = e.context or "", start
    while len(tokenizer(QA_TEMPLATE.render(e.question or "", context))["input_ids"]) < n_tokens:
        context = facts[j % len(facts)] + " " + context
        j += step
    return context


def prompt_of_length(tokenizer: Any, n_tokens: int) -> ConflictExample:
    """A shipped conflict question whose context is padded with other conflict facts to ~n tokens."""
    examples = load_examples("conflicts").examples
    target = examples[12]  # the India / China example
    facts = [e.context for e in examples if e.id != target.id and e.context]
    context = _padded_context(tokenizer, target, facts, n_tokens, 0, 1)
    return target.model_copy(update={
        "id": f"bench-{n_tokens}", "prompt": QA_TEMPLATE.render(target.question or "", context), "context": context,
    })


def rag_examples(tokenizer: Any, n: int, n_tokens: int) -> list[ConflictExample]:
    """``n`` shipped conflicts, each with its context padded by other facts to about ``n_tokens``
    tokens (RAG-sized prompts; the agreeing context padded alike)."""
    examples = load_examples("conflicts").examples
    facts = [e.context for e in examples if e.context]
    out = []
    for i in range(n):
        e = examples[i % len(examples)]
        context = _padded_context(tokenizer, e, facts, n_tokens, i, 7)
        agreeing = replace_answer(context, e.answer, e.memorized)
        out.append(e.model_copy(update={
            "id": f"rag-{i}", "context": context, "prompt": QA_TEMPLATE.render(e.question or "", context),
            "agreeing_context": agreeing,
            "agreeing_prompt": QA_TEMPLATE.render(e.question or "", agreeing) if agreeing else None}))
    return out


def file_and_rows(source: str) -> tuple[str, int]:
    """``FILE[:K]`` -> (FILE, K), K = 3 when not given."""
    path, _, k = source.rpartition(":") if source.rsplit(":", 1)[-1].isdigit() else (source, "", "3")
    return path, int(k)


def bench_examples(tokenizer: Any, source: str) -> list[ConflictExample]:
    """``len:N`` -> the padded shipped example of ~N tokens; ``FILE[:K]`` -> the first K rows (3)."""
    if source.startswith("len:"):
        return [prompt_of_length(tokenizer, int(source[4:]))]
    path, k = file_and_rows(source)
    return load_examples(path, limit=k, tokenizer=tokenizer).examples
