"""A LangChain chat model for an exported checkpoint served by ``ircan serve``: ``ChatOpenAI``
pointed at vLLM, plus the checkpoint's RAG context slot."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_openai import ChatOpenAI
from pydantic import Field, PrivateAttr

from ..errors import IrcanError
from ..serving.cad import CadClient, CadResult
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

    _cad: CadClient | None = PrivateAttr(default=None)
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

    def _cad_pair(self, messages: Any, context: str | None) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        """The chat messages with the context in the last human message, and the same messages
        with that message rendered without it (the server applies the chat template to both)."""
        from langchain_core.messages import convert_to_messages
        from langchain_openai.chat_models.base import _convert_message_to_dict

        template = self._template_for_cad()
        messages = convert_to_messages(messages)
        with_context = self._with_slot(messages, context)
        last = max(i for i, m in enumerate(with_context) if isinstance(m, HumanMessage))
        without = list(with_context)
        without[last] = HumanMessage(content=template.render(_question_of(messages)))
        return ([_convert_message_to_dict(m) for m in with_context], [_convert_message_to_dict(m) for m in without])

    def _cad_output(self, texts: list[tuple[str, CadResult]]) -> ChatResult:
        text, result = texts[0]
        message = AIMessage(content=text, response_metadata={
            "finish_reason": result.finish_reason, "model_name": self.model_name, "cad_alpha": self.cad_alpha,
            "cad_changed_tokens": result.changed})
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _cad_chunk(self, text: str) -> ChatGenerationChunk:
        return ChatGenerationChunk(message=AIMessageChunk(content=text))


def _question_of(messages: list[BaseMessage]) -> str:
    """The text of the last human message (the question the context slot is filled around)."""
    return next(m.text for m in reversed(messages) if isinstance(m, HumanMessage))
