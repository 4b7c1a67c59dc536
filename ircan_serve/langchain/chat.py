"""A LangChain chat model for an exported checkpoint served by ``ircan serve``: ``ChatOpenAI``
pointed at vLLM, plus the checkpoint's RAG context slot."""

from __future__ import annotations

from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI
from pydantic import Field

from ..errors import IrcanError
from ._base import IrcanEndpoint


class ChatIrcan(IrcanEndpoint, ChatOpenAI):  # type: ignore[misc]  # the mixin's fields redefine the base's
    """Chat model served by ``ircan serve`` (vLLM's OpenAI ``/v1/chat/completions``).

    A ``ChatOpenAI`` subclass, so everything ``ChatOpenAI`` does against vLLM works: tool calling
    (``bind_tools``; ``tool_choice="any"`` or a named tool uses vLLM's guided decoding, ``"auto"``
    needs ``ircan serve --enable-tools``), ``with_structured_output`` (json_schema, guided
    decoding), ``logprobs``, ``n``, ``seed``, ``top_p``, usage, streaming, async, batching,
    serialization. Errors are ``openai`` exceptions, so ``with_retry`` works.

    Setup:
        .. code-block:: bash

            ircan export export/smollm2-conflicts.toml
            ircan serve export/out/smollm2-conflicts --port 8000

    Instantiate:
        .. code-block:: python

            from ircan_serve.langchain import ChatIrcan
            chat = ChatIrcan.from_checkpoint(
                "export/out/smollm2-conflicts", base_url="http://127.0.0.1:8000/v1",
                max_tokens=64, timeout=30,
            )

    Invoke:
        .. code-block:: python

            chat.invoke([("system", "Answer briefly."), ("human", "Capital of France?")])
            # the RAG context slot goes into the last human message, with the checkpoint's template:
            chat.invoke("What is the capital of France?", context="The capital of France is Lyon.")
            await chat.ainvoke("Hello")

    Stream:
        .. code-block:: python

            for chunk in chat.stream("Tell me a story"):
                print(chunk.content, end="", flush=True)
    """

    temperature: float | None = 0.0
    """Sampling temperature (0: greedy, the setting IRCAN is evaluated with)."""
    max_tokens: int | None = Field(default=256, alias="max_completion_tokens")
    """Most tokens to generate."""
    stream_usage: bool | None = True
    """Report token usage at the end of a stream."""

    @property
    def _llm_type(self) -> str:
        return "ircan-vllm-chat"

    def _with_slot(self, messages: list[BaseMessage], context: str | None) -> list[BaseMessage]:
        """The context in the last human message, and the template's system message first (as
        attribution rendered the prompt)."""
        messages = list(messages)
        if context is not None:
            last = max((i for i, m in enumerate(messages) if isinstance(m, HumanMessage)), default=None)
            if last is None:
                raise IrcanError("a context was given but there is no human message to attach it to")
            messages[last] = HumanMessage(content=self._with_context(messages[last].text, context))
        template = self.prompt_template
        if template is not None and template.system and not any(isinstance(m, SystemMessage) for m in messages):
            messages.insert(0, SystemMessage(content=template.system))
        return messages
