"""LangChain integrations: the patched checkpoint as a string LLM and a chat model, and RAG helpers."""

from ._base import IrcanConnectionError, IrcanTimeoutError
from .chat import ChatIrcan
from .llm import IrcanLLM

__all__ = ["ChatIrcan", "IrcanConnectionError", "IrcanLLM", "IrcanTimeoutError"]
