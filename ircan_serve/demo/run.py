"""The main job, end to end: patched vs original behind vLLM, in LangChain RAG, one table per setting.

For each recipe the demo asks questions that attribution and tuning never saw (the recipe's test
split, or the rows after its ``limit``). Each question is asked in several **settings**, the
contexts users retrieve (:data:`SETTINGS`): the product's retriever over *all* the recipe's rows
with k = 1 or k = 4 (how often the question's own document was among them is reported), passages
built from the row (:mod:`ircan_serve.data.contexts`), and documents about other subjects only,
where the model should keep its own answer. Each setting is answered by every served **method**
(:data:`METHODS`): the original and the patched checkpoint, each with the recipe's prompt and with
the instruction users already write, and context-aware decoding on both (``--cad``), all through
the same :class:`~ircan_serve.langchain.IrcanLLM` / :class:`~ircan_serve.langchain.ChatIrcan`.

The side checks of rows that have them are asked too: the locality fact without context (its true
answer must survive) and a context that states the true answer (which must still be followed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..answers import answer_matches
from ..checkpoint.manifest import Manifest
from ..data import ConflictExample
from ..errors import IrcanError, table_entry
from ..prompts import PromptTemplate, instructed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSetting:
    """Where a question's context comes from: the retriever's top ``k``, or a context format."""

    description: str
    k: int | None = None
    context: str | None = None
    relevant: bool = True
    """The context states the row's answer; False: the model should keep its memorized one."""
    chat: bool = False
    """Asked through ChatIrcan (the chat template, the recipe's text as the user message)."""


SETTINGS: dict[str, DemoSetting] = {
    "retrieved-1": DemoSetting("the retriever's top document", k=1),
    "retrieved-4": DemoSetting("the retriever's top 4 documents", k=4),
    "passage-list": DemoSetting("a numbered list of claims with a distractor", context="passage-list"),
    "passage-prose": DemoSetting("a paragraph of claims among distractors", context="passage-prose"),
    "passage-bullets": DemoSetting("a fact sheet of bullets, worded apart from the numbered list",
                                   context="passage-bullets"),
    "irrelevant": DemoSetting("the 4 nearest documents about other subjects only", context="irrelevant",
                              relevant=False),
    "chat-retrieved-4": DemoSetting("the retriever's top 4 documents, through ChatIrcan (chat template)", k=4,
                                    chat=True),
}
"""Demo setting name -> where the context comes from."""


@dataclass(frozen=True)
class DemoMethod:
    patched: bool
    instruction: bool = False
    cad: bool = False


METHODS: dict[str, DemoMethod] = {
    "original": DemoMethod(patched=False),
    "instruction": DemoMethod(patched=False, instruction=True),
    "IRCAN": DemoMethod(patched=True),
    "IRCAN+instruction": DemoMethod(patched=True, instruction=True),
    "CAD": DemoMethod(patched=False, cad=True),
    "IRCAN+CAD": DemoMethod(patched=True, cad=True),
}
"""Served method name -> which checkpoint, which prompt, which decoding."""


@dataclass
class DemoRow:
    example: ConflictExample
    context: str
    answers: dict[str, str] = field(default_factory=dict)
    own_document: bool | None = None
    """Retrieval settings: the question's own document was among those retrieved."""
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
    """One recipe's part of the demo: its checkpoint, corpus, held-out questions and their answers."""

    name: str
    checkpoint: Path
    template: PromptTemplate
    documents: list[ConflictExample]
    questions: list[ConflictExample]
    rows: list[DemoRow] = field(default_factory=list)
    """The first setting's rows (which also hold the side checks)."""
    settings: dict[str, list[DemoRow]] = field(default_factory=dict)


def held_out_questions(recipe_path: str | Path, lm: Any = None) -> tuple[list[ConflictExample], list[ConflictExample]]:
    """(all rows, rows attribution and tuning never read) of a recipe.

    With ``[splits]`` the held-out rows are its test split (the known-facts filter, if any, needs
    the model ``lm``, loaded when not given); without, the rows after ``limit``.
    """
    from ..models import load_model
    from ..pipeline import read_recipe, recipe_data

    recipe = read_recipe(recipe_path)
    if recipe.splits is None and not recipe.known_only and not (recipe.prompt and recipe.prompt.chat):
        from ..data import load_examples

        rows = load_examples(recipe.data_file(), recipe.data_format, template=recipe.prompt).examples
        held = rows[recipe.limit:] if recipe.limit else []
    else:
        data = recipe_data(recipe, lm or load_model(recipe.model), progress=False)
        rows, held = data.corpus, data.test
    if not held:
        raise IrcanError(f"{recipe_path} uses every row for attribution and tuning (no `limit` or "
                         "[splits]): there are no held-out questions")
    return rows, held


def build_settings(s: DemoSet, names: Sequence[str]) -> None:
    """Each question's context in every setting of ``names`` (the retriever's, or a built one)."""
    from ..data.contexts import ContextPool, context_format
    from ..retrieval import build_retriever, conflict_documents

    documents = conflict_documents(s.documents)
    pool = ContextPool(s.documents, k=4)
    for name in names:
        setting = demo_setting(name)
        if setting.k is not None:
            retriever = build_retriever(documents, k=setting.k)
            found = retriever.batch([e.question or "" for e in s.questions])
            s.settings[name] = [DemoRow(e, " ".join(d.page_content for d in docs),
                                        own_document=any(d.metadata["id"] == e.id for d in docs))
                                for e, docs in zip(s.questions, found)]
        else:
            build = context_format(setting.context or "").build
            s.settings[name] = [DemoRow(e, build(e, pool)) for e in s.questions]
    s.rows = s.settings[names[0]]


def demo_setting(name: str) -> DemoSetting:
    return table_entry(SETTINGS, name, "demo setting", "ircan_serve/demo/run.py:SETTINGS")


def _wrapper(server: Any, template: PromptTemplate, cad_alpha: float | None) -> Any:
    """IrcanLLM for a text-mode checkpoint, ChatIrcan for a chat-mode one (as it was attributed)."""
    from ..checkpoint.manifest import eos_token_ids
    from ..langchain import ChatIrcan, IrcanLLM

    cls = ChatIrcan if template.chat else IrcanLLM
    params: dict[str, Any] = {"model": server.model_name, "base_url": server.base_url, "max_tokens": 16,
                              "stop": ["\n"], "prompt_template": template, "timeout": 300}
    if cad_alpha is not None:
        params |= {"cad_alpha": cad_alpha, "cad_eos_token_ids": eos_token_ids(server.model_dir)}
    return cls(**params)


def _answer(llm: Any, rows: list[DemoRow], label: str, concurrency: int) -> None:
    """Every row's question with its context, through the wrapper's context slot."""
    from ..langchain.rag import ask_with_contexts, first_line

    texts = ask_with_contexts(llm, [(r.example.question or "", r.context) for r in rows], concurrency)
    for row, text in zip(rows, texts):
        row.answers[label] = first_line(text)


def _side_checks(llm: Any, s: DemoSet, label: str) -> None:
    from ..langchain.rag import first_line, text_of

    for kind in ("locality", "agreeing"):
        idx, prompts = [], []
        for i, e in enumerate(s.questions):
            if kind == "locality" and e.locality_prompt and e.locality_answer:
                prompt = s.template.render(e.locality_question or "") if s.template.chat else e.locality_prompt
            elif kind == "agreeing" and e.agreeing_context and e.question:
                prompt = s.template.render(e.question, e.agreeing_context)
            else:
                continue
            idx.append(i)
            prompts.append(prompt)
        for i, text in zip(idx, llm.batch(prompts) if prompts else []):
            getattr(s.rows[i], kind)[label] = first_line(text_of(text))


def _ask_all(server: Any, sets: list[DemoSet], patched: bool, cad_alpha: float | None, cad_limit: int,
             cad_settings: Sequence[str] | None, concurrency: int, done: Callable[[], None]) -> None:
    """Every method served by ``server`` (the original, or each set's patched checkpoint); ``done``
    after each method, so that a long run keeps what it has answered."""
    from tqdm.auto import tqdm

    for s in sets:
        for label, method in METHODS.items():
            if method.patched != patched or (method.cad and cad_alpha is None):
                continue
            if label in ("original", "IRCAN"):
                _side_checks(_wrapper(server, s.template, None), s, label)
            for name, rows in tqdm(s.settings.items(), desc=f"{s.name}: {label}", leave=False):
                if method.cad and cad_settings is not None and name not in cad_settings:
                    continue
                template = s.template.model_copy(update={"chat": True}) if SETTINGS[name].chat else s.template
                template = instructed(template) if method.instruction else template
                llm = _wrapper(server, template, cad_alpha if method.cad else None)
                _answer(llm, rows[:cad_limit] if method.cad else rows, label, concurrency)
            done()


def run_demo(sets: Sequence[tuple[str | Path, str | Path]], base: str = "smollm2", *,
             settings: Sequence[str] = ("retrieved-1", "retrieved-4", "passage-list", "irrelevant"),
             limit: int | None = None, cad_alpha: float | None = 0.5, cad_limit: int = 100,
             cad_settings: Sequence[str] | None = None, concurrency: int = 16,
             save: Callable[[list[DemoSet]], None] | None = None) -> list[DemoSet]:
    """Serve the base once and each (checkpoint, recipe) in turn; ask every set's questions in every
    setting, by every method; CAD on the first ``cad_limit`` questions (two requests per token) of
    each setting, or only of ``cad_settings``.
    ``save`` gets every set after each method (what is answered so far)."""
    from ..models import load_model, resolve_model
    from ..pipeline import read_recipe
    from ..serving import VLLMServer

    demo_sets = []
    lm = None
    for checkpoint, recipe_path in sets:
        manifest = Manifest.load(checkpoint)
        recipe = read_recipe(recipe_path)
        if (recipe.splits or recipe.known_only) and lm is None:
            lm = load_model(recipe.model)
        rows, held = held_out_questions(recipe_path, lm)
        s = DemoSet(recipe.name, Path(checkpoint), manifest.prompt_template or PromptTemplate(
            with_context="{context}\n{question}", without_context="{question}"), rows, held[:limit])
        build_settings(s, list(settings))
        demo_sets.append(s)
    lm = None  # free the model before the servers start

    def done() -> None:
        if save is not None:
            save(demo_sets)

    with VLLMServer(resolve_model(base), require_manifest=False) as server:
        _ask_all(server, demo_sets, False, cad_alpha, cad_limit, cad_settings, concurrency, done)
    for s in demo_sets:
        with VLLMServer(s.checkpoint) as server:
            _ask_all(server, [s], True, cad_alpha, cad_limit, cad_settings, concurrency, done)
    return demo_sets
