"""A small offline RAG chain: retriever -> prompt (the checkpoint's template) -> IRCAN model ->
answer. The retriever comes from :mod:`ircan_serve.retrieval` (local embeddings, in-memory store)."""

from __future__ import annotations

from langchain_core.documents import Document
from langchain_core.language_models import BaseLanguageModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough

from ..prompts import QA_TEMPLATE, PromptTemplate
from ..retrieval import MiniLMEmbeddings, build_retriever, conflict_documents

__all__ = ["MiniLMEmbeddings", "build_retriever", "conflict_documents", "first_line", "format_docs",
           "make_rag_chain"]

def format_docs(docs: list[Document]) -> str:
    return " ".join(d.page_content for d in docs)


def first_line(text: str) -> str:
    """The answer up to the first line break, stripped."""
    return text.strip().split("\n", 1)[0].strip()


def make_rag_chain(retriever: BaseRetriever, llm: BaseLanguageModel,
                   template: PromptTemplate | None = None) -> Runnable:
    """question -> {"question", "context", "answer"}: retrieve, fill the template, ask, parse.

    ``template`` defaults to the LLM's ``prompt_template`` (from the checkpoint's manifest).
    """
    template = template or getattr(llm, "prompt_template", None) or QA_TEMPLATE
    # The prompt is rendered by the same code as attribution's (ircan_serve.prompts), not by a
    # second template engine; a chat model gets it as the user message, as ChatIrcan's context slot does.
    prompt: Runnable[dict[str, str], str] = RunnableLambda(lambda x: template.render(x["question"], x["context"]))
    answer = prompt | llm | StrOutputParser() | RunnableLambda(first_line)
    return (
        {"context": retriever | format_docs, "question": RunnablePassthrough()}
        | RunnablePassthrough.assign(answer=answer)
    )
