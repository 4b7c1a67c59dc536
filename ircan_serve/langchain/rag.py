"""A small offline RAG chain: retriever -> prompt (the checkpoint's template) -> IRCAN model ->
answer. The retriever comes from :mod:`ircan_serve.retrieval` (local embeddings, in-memory store)."""

from __future__ import annotations

from typing import Any

from langchain_core.documents import Document
from langchain_core.language_models import BaseLanguageModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda, RunnablePassthrough

from ..prompts import QA_TEMPLATE, PromptTemplate
from ..retrieval import MiniLMEmbeddings, build_retriever, conflict_documents
from ._base import IrcanEndpoint

__all__ = ["MiniLMEmbeddings", "ask_with_contexts", "build_retriever", "conflict_documents", "first_line",
           "format_docs", "make_rag_chain", "text_of"]

def format_docs(docs: list[Document]) -> str:
    return " ".join(d.page_content for d in docs)


def text_of(output: Any) -> str:
    """The text of a string LLM's output or a chat model's message."""
    return output if isinstance(output, str) else str(output.content)


def ask_with_contexts(llm: Any, pairs: list[tuple[str, str]], concurrency: int = 8) -> list[str]:
    """Each (question, context) through an IRCAN wrapper's context slot, ``concurrency`` at a time;
    the texts, in order."""
    ask: RunnableLambda[tuple[str, str], Any] = RunnableLambda(lambda qc: llm.invoke(qc[0], context=qc[1]))
    return [text_of(o) for o in ask.batch(pairs, config={"max_concurrency": concurrency})]


def first_line(text: str) -> str:
    """The answer up to the first line break, stripped."""
    return text.strip().split("\n", 1)[0].strip()


def make_rag_chain(retriever: BaseRetriever, llm: BaseLanguageModel,
                   template: PromptTemplate | None = None) -> Runnable:
    """question -> {"question", "documents", "context", "answer"}: retrieve (``documents``: what the
    retriever returned, with their metadata, e.g. to check the question's own document was among
    the top k), fill the template with their text (``context``), ask, parse.

    An IRCAN wrapper gets the question and the retrieved context apart (its context slot renders
    them with the checkpoint's template, and CAD needs both); any other model gets the prompt
    rendered with ``template`` (default: the LLM's ``prompt_template``, else the QA template).
    """
    template = template or getattr(llm, "prompt_template", None) or QA_TEMPLATE
    slot = isinstance(llm, IrcanEndpoint) and llm.prompt_template == template

    def ask(x: dict[str, str], config: RunnableConfig) -> Any:
        if slot:
            return llm.invoke(x["question"], config, context=x["context"])
        return llm.invoke(template.render(x["question"], x["context"]), config)

    async def aask(x: dict[str, str], config: RunnableConfig) -> Any:
        if slot:
            return await llm.ainvoke(x["question"], config, context=x["context"])
        return await llm.ainvoke(template.render(x["question"], x["context"]), config)

    answer = RunnableLambda(ask, afunc=aask) | StrOutputParser() | RunnableLambda(first_line)
    return (
        {"documents": retriever, "question": RunnablePassthrough()}
        | RunnablePassthrough.assign(context=lambda x: format_docs(x["documents"]))
        | RunnablePassthrough.assign(answer=answer)
    )
