"""The main job, end to end: patched vs original SmolLM2 behind vLLM, in a LangChain RAG chain.

The recipe attributes on the first ``limit`` rows of the shipped conflict set; the demo asks the
remaining rows' questions, so every answer shown is on a question the neurons were not found on.
The retriever searches the contexts of all rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .config import load_recipe
from .data import ConflictExample, load_examples
from .errors import IrcanError
from .evaluation.metrics import answer_matches
from .export import Manifest

log = logging.getLogger(__name__)


@dataclass
class DemoRow:
    example: ConflictExample
    context: str
    answers: dict[str, str]

    def follows(self, model: str) -> bool:
        """The answer names the context's answer and not the memorized one."""
        return answer_matches(self.answers[model], self.example.answer) and not self.stubborn(model)

    def stubborn(self, model: str) -> bool:
        return answer_matches(self.answers[model], self.example.memorized)


def held_out_questions(recipe_path: str | Path) -> tuple[list[ConflictExample], list[ConflictExample]]:
    """(all rows, rows the recipe did not attribute on)."""
    recipe = load_recipe(recipe_path)
    rows = load_examples(recipe.data, recipe.data_format).examples
    held = rows[recipe.limit:] if recipe.limit else []
    if not held:
        raise IrcanError(f"{recipe_path} uses every row (no `limit`): there are no held-out questions")
    return rows, held


def run_demo(checkpoint: str | Path, recipe_path: str | Path, base: str = "smollm2") -> list[DemoRow]:
    """Serve the base and the patched checkpoint in turn and run the RAG chain through both."""
    from .langchain import IrcanLLM
    from .langchain.rag import build_retriever, conflict_documents, make_rag_chain
    from .models import resolve_model
    from .serving import VLLMServer

    manifest = Manifest.load(checkpoint)
    rows, held = held_out_questions(recipe_path)
    retriever = build_retriever(conflict_documents(rows))
    answers: dict[str, list[dict]] = {}
    for label, folder, plain in (("original", resolve_model(base), True), ("IRCAN", checkpoint, False)):
        with VLLMServer(folder, require_manifest=not plain) as server:
            llm = IrcanLLM(model=server.model_name, base_url=server.base_url, max_tokens=16,
                           stop=["\n"], prompt_template=manifest.prompt_template)
            chain = make_rag_chain(retriever, llm)
            answers[label] = chain.batch([e.question for e in held])
    return [
        DemoRow(e, answers["original"][i]["context"], {k: v[i]["answer"] for k, v in answers.items()})
        for i, e in enumerate(held)
    ]


def print_demo(rows: list[DemoRow]) -> None:
    """The side-by-side table and the share of answers that follow the context."""
    from rich.console import Console
    from rich.table import Table

    def cell(row: DemoRow, model: str) -> str:
        mark = "[green]✓[/]" if row.follows(model) else ("[red]✗ memorized[/]" if row.stubborn(model) else "[yellow]·[/]")
        return f"{row.answers[model]}  {mark}"

    table = Table(title="RAG over counterfactual documents: original vs IRCAN SmolLM2 (held-out questions)",
                  show_lines=True)
    for col in ("question", "retrieved context", "original", "IRCAN"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r.example.question or "", r.context, cell(r, "original"), cell(r, "IRCAN"))
    console = Console(width=160)
    console.print(table)
    n = len(rows)
    for model in ("original", "IRCAN"):
        follow = sum(r.follows(model) for r in rows)
        stub = sum(r.stubborn(model) for r in rows)
        console.print(f"{model:>8}: follows the context {follow}/{n} ({follow / n:.0%}), "
                      f"gives the memorized answer {stub}/{n} ({stub / n:.0%})")
    wrong_doc = sum(r.context != (r.example.context or "") for r in rows)
    if wrong_doc:
        console.print(f"(the retriever returned another document for {wrong_doc} of {n} questions)")
