"""The main job, end to end: patched vs original SmolLM2 behind vLLM, in a LangChain RAG chain.

For each recipe the demo asks questions that attribution and tuning never saw (the recipe's test
split, or the rows after its ``limit``), and the retriever searches the contexts of *all* the
recipe's rows. The original model is served once; each recipe's checkpoint is served in turn.
Every answer comes from the served endpoint through :class:`~ircan_serve.langchain.IrcanLLM`.

Through the same endpoints the demo also asks the side checks of rows that have them: the
locality fact without context (its true answer must survive) and the question with a context
that states the true answer (which must still be followed).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .answers import answer_matches
from .checkpoint.manifest import Manifest
from .config import load_recipe
from .data import ConflictExample
from .errors import IrcanError
from .evaluation.stats import PairedTest, mcnemar, wilson_interval
from .prompts import PromptTemplate

log = logging.getLogger(__name__)

MODELS = ("original", "IRCAN")


@dataclass
class DemoRow:
    example: ConflictExample
    context: str
    answers: dict[str, str]
    locality: dict[str, str] = field(default_factory=dict)
    agreeing: dict[str, str] = field(default_factory=dict)

    def follows(self, model: str) -> bool:
        """The answer names the context's answer and not the memorized one."""
        return answer_matches(self.answers[model], self.example.answer) and not self.stubborn(model)

    def stubborn(self, model: str) -> bool:
        return answer_matches(self.answers[model], self.example.memorized)

    def locality_ok(self, model: str) -> bool | None:
        if model not in self.locality:
            return None
        return answer_matches(self.locality[model], self.example.locality_answer or "")

    def agreeing_ok(self, model: str) -> bool | None:
        if model not in self.agreeing:
            return None
        return answer_matches(self.agreeing[model], self.example.memorized)


@dataclass
class DemoSet:
    """One recipe's part of the demo: its checkpoint, corpus and held-out questions."""

    name: str
    checkpoint: Path
    template: PromptTemplate
    documents: list[ConflictExample]
    questions: list[ConflictExample]
    rows: list[DemoRow] = field(default_factory=list)


def held_out_questions(recipe_path: str | Path, lm: Any = None) -> tuple[list[ConflictExample], list[ConflictExample]]:
    """(all rows, rows attribution and tuning never read) of a recipe.

    With ``[splits]`` the held-out rows are its test split (the known-facts filter, if any, needs
    the model ``lm``, loaded when not given); without, the rows after ``limit``.
    """
    from .models import load_model
    from .pipeline import recipe_data

    recipe = load_recipe(recipe_path)
    if recipe.splits is None and not recipe.known_only and not (recipe.prompt and recipe.prompt.chat):
        from .data import load_examples

        rows = load_examples(recipe.data_file(), recipe.data_format, template=recipe.prompt).examples
        held = rows[recipe.limit:] if recipe.limit else []
    else:
        data = recipe_data(recipe, lm or load_model(recipe.model), progress=False)
        rows, held = data.all, data.test
    if not held:
        raise IrcanError(f"{recipe_path} uses every row for attribution and tuning (no `limit` or "
                         "[splits]): there are no held-out questions")
    return rows, held


def _ask(llm: Any, s: DemoSet, label: str, retriever: Any, with_checks: bool) -> None:
    from .langchain.rag import first_line, make_rag_chain

    chain = make_rag_chain(retriever, llm, s.template)
    outputs = chain.batch([e.question for e in s.questions])
    if not s.rows:
        s.rows = [DemoRow(e, o["context"], {}) for e, o in zip(s.questions, outputs)]
    for row, o in zip(s.rows, outputs):
        row.answers[label] = o["answer"]
    if not with_checks:
        return
    for kind in ("locality", "agreeing"):
        idx, prompts = [], []
        for i, e in enumerate(s.questions):
            if kind == "locality" and e.locality_prompt and e.locality_answer:
                # a chat model gets the bare question (ChatIrcan applies the chat template itself)
                prompt = s.template.render(e.locality_question or "") if s.template.chat else e.locality_prompt
            elif kind == "agreeing" and e.agreeing_context and e.question:
                prompt = s.template.render(e.question, e.agreeing_context)
            else:
                continue
            idx.append(i)
            prompts.append(prompt)
        if prompts:
            for i, text in zip(idx, llm.batch(prompts)):
                getattr(s.rows[i], kind)[label] = first_line(text)


def run_demo(sets: Sequence[tuple[str | Path, str | Path]], base: str = "smollm2") -> list[DemoSet]:
    """Serve the base once and each (checkpoint, recipe) in turn; ask every set's questions."""
    from .langchain import ChatIrcan, IrcanLLM
    from .models import load_model, resolve_model
    from .retrieval import build_retriever, conflict_documents
    from .serving import VLLMServer

    demo_sets = []
    lm = None
    for checkpoint, recipe_path in sets:
        manifest = Manifest.load(checkpoint)
        recipe = load_recipe(recipe_path)
        if (recipe.splits or recipe.known_only) and lm is None:
            lm = load_model(recipe.model)
        rows, held = held_out_questions(recipe_path, lm)
        demo_sets.append(DemoSet(recipe.name, Path(checkpoint), manifest.prompt_template or PromptTemplate(
            with_context="{context}\n{question}", without_context="{question}"), rows, held))
    lm = None  # free the model before the servers start
    retrievers = {s.name: build_retriever(conflict_documents(s.documents)) for s in demo_sets}

    def llm(server: VLLMServer, template: PromptTemplate) -> IrcanLLM | ChatIrcan:
        """IrcanLLM for a text-mode checkpoint, ChatIrcan for a chat-mode one (as it was attributed)."""
        cls = ChatIrcan if template.chat else IrcanLLM
        params: dict[str, Any] = {"model": server.model_name, "base_url": server.base_url, "max_tokens": 16,
                                  "stop": ["\n"], "prompt_template": template, "timeout": 300}
        return cls(**params)

    with VLLMServer(resolve_model(base), require_manifest=False) as server:
        for s in demo_sets:
            _ask(llm(server, s.template), s, "original", retrievers[s.name], with_checks=True)
    for s in demo_sets:
        with VLLMServer(s.checkpoint) as server:
            _ask(llm(server, s.template), s, "IRCAN", retrievers[s.name], with_checks=True)
    return demo_sets


def summarize_set(s: DemoSet) -> dict[str, Any]:
    """Follow / memorized / side-check rates with 95% intervals, and McNemar against the original."""
    out: dict[str, Any] = {"name": s.name, "questions": len(s.rows), "documents": len(s.documents)}
    for metric, fn in (("follows", DemoRow.follows), ("memorized", DemoRow.stubborn),
                       ("locality", DemoRow.locality_ok), ("agreeing", DemoRow.agreeing_ok)):
        per_model: dict[str, Any] = {}
        for m in MODELS:
            values = [v for v in (fn(r, m) for r in s.rows) if v is not None]
            if values:
                k, n = sum(values), len(values)
                per_model[m] = {"k": k, "n": n, "rate": k / n, "ci": wilson_interval(k, n)}
        if len(per_model) == 2:
            a = [fn(r, MODELS[0]) for r in s.rows]
            b = [fn(r, MODELS[1]) for r in s.rows]
            pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
            test: PairedTest = mcnemar([x for x, _ in pairs], [y for _, y in pairs])
            per_model["mcnemar"] = test.model_dump()
        out[metric] = per_model
    return out


def print_demo(sets: list[DemoSet], table_limit: int = 30) -> list[dict[str, Any]]:
    """A side-by-side table for small sets; for every set the rates with intervals and p-values."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)

    def cell(row: DemoRow, model: str) -> str:
        mark = "[green]✓[/]" if row.follows(model) else ("[red]✗ memorized[/]" if row.stubborn(model) else "[yellow]·[/]")
        return f"{row.answers[model]}  {mark}"

    summaries = []
    for s in sets:
        if len(s.rows) <= table_limit:
            table = Table(title=f"{s.name}: RAG over {len(s.documents)} counterfactual documents, "
                          "original vs IRCAN (held-out questions)", show_lines=True)
            for col in ("question", "retrieved context", *MODELS):
                table.add_column(col, overflow="fold")
            for r in s.rows:
                table.add_row(r.example.question or "", r.context, cell(r, "original"), cell(r, "IRCAN"))
            console.print(table)
        summary = summarize_set(s)
        summaries.append(summary)
        console.print(f"[bold]{s.name}[/]: {len(s.rows)} held-out questions, retriever over "
                      f"{len(s.documents)} documents (served by vLLM, through IrcanLLM)")
        for metric, label in (("follows", "follows the context"), ("memorized", "gives the memorized answer"),
                              ("locality", "locality facts (no context)"),
                              ("agreeing", "agreeing contexts (true answer)")):
            per = summary.get(metric) or {}
            if not per:
                continue
            parts = [f"{m} {v['k']}/{v['n']} = {v['rate']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]"
                     for m, v in per.items() if m in MODELS]
            t = per.get("mcnemar")
            p = f"; Δ {t['difference']:+.3f}, McNemar p = {t['p_value']:.2g}" if t else ""
            console.print(f"  {label:>32}: " + ", ".join(parts) + p)
        wrong = sum(r.context != (r.example.context or "") for r in s.rows)
        if wrong:
            console.print(f"  (the retriever returned another document for {wrong} of {len(s.rows)} questions)")
    return summaries
