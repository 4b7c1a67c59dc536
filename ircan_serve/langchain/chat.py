"""A LangChain chat model over the vLLM chat-completions endpoint of an exported checkpoint."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LangSmithParams
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from ..errors import IrcanError
from ._base import IrcanClientParams, translate_errors

_ROLES = {HumanMessage: "user", AIMessage: "assistant", SystemMessage: "system"}


def _text(content: str | list[Any]) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block["text"])
        else:
            raise IrcanError(f"only text content is supported, got a {block.get('type')!r} block")
    return "".join(parts)


def to_openai_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as OpenAI chat messages (text only)."""
    out = []
    for m in messages:
        if isinstance(m, ChatMessage):
            role = m.role
        else:
            role = next((r for cls, r in _ROLES.items() if isinstance(m, cls)), None)
        if role is None:
            raise IrcanError(f"{type(m).__name__} is not supported (no tool calling); "
                             "use system, human and AI messages")
        out.append({"role": role, "content": _text(m.content)})
    return out


def _usage(usage: Any) -> UsageMetadata | None:
    if usage is None:
        return None
    return UsageMetadata(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                         total_tokens=usage.total_tokens)


class ChatIrcan(IrcanClientParams, BaseChatModel):
    """Chat model served by ``ircan serve`` (vLLM's OpenAI ``/v1/chat/completions``).

    Setup:
        .. code-block:: bash

            pip install ircan-serve[cpu]      # or [gpu]
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

    @property
    def _llm_type(self) -> str:
        return "ircan-vllm-chat"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = self._request_params(stop, kwargs)
        return LangSmithParams(
            ls_provider="ircan", ls_model_name=params["model"], ls_model_type="chat",
            ls_temperature=params.get("temperature"), ls_max_tokens=params.get("max_tokens"),
            ls_stop=params.get("stop"),
        )

    def _messages(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> list[dict[str, str]]:
        out = to_openai_messages(messages)
        context = kwargs.get("context")
        if context is not None:
            last = max((i for i, m in enumerate(out) if m["role"] == "user"), default=None)
            if last is None:
                raise IrcanError("a context was given but there is no human message to attach it to")
            out[last]["content"] = self._with_context(out[last]["content"], context)
        template = self.prompt_template
        if template is not None and template.system and not any(m["role"] == "system" for m in out):
            out.insert(0, {"role": "system", "content": template.system})  # as attribution rendered it
        return out

    def _result(self, response: Any) -> ChatResult:
        choice = response.choices[0]
        message = AIMessage(
            content=choice.message.content or "",
            usage_metadata=_usage(response.usage),
            response_metadata={"model_name": response.model, "finish_reason": choice.finish_reason,
                               "model_provider": "ircan"},
        )
        return ChatResult(generations=[ChatGeneration(message=message)],
                          llm_output={"model_name": response.model})

    def _chunk(self, event: Any) -> ChatGenerationChunk | None:
        if event.choices:
            choice = event.choices[0]
            text = choice.delta.content or ""
            meta = {"finish_reason": choice.finish_reason} if choice.finish_reason else {}
            if not text and not meta:
                return None
            return ChatGenerationChunk(message=AIMessageChunk(content=text, response_metadata=meta))
        if event.usage is not None:  # the last event of a stream with include_usage
            return ChatGenerationChunk(message=AIMessageChunk(
                content="", usage_metadata=_usage(event.usage),
                response_metadata={"model_name": event.model, "model_provider": "ircan"},
                chunk_position="last",
            ))
        return None

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        with translate_errors(self.base_url):
            response = self._client.chat.completions.create(
                messages=self._messages(messages, kwargs), **self._request_params(stop, kwargs))
        return self._result(response)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None,
                         **kwargs: Any) -> ChatResult:
        with translate_errors(self.base_url):
            response = await self._async_client.chat.completions.create(
                messages=self._messages(messages, kwargs), **self._request_params(stop, kwargs))
        return self._result(response)

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        with translate_errors(self.base_url):
            events = self._client.chat.completions.create(
                messages=self._messages(messages, kwargs), stream=True,
                stream_options={"include_usage": True}, **self._request_params(stop, kwargs))
            for event in events:
                chunk = self._chunk(event)
                if chunk is not None:
                    if run_manager:
                        run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        with translate_errors(self.base_url):
            events = await self._async_client.chat.completions.create(
                messages=self._messages(messages, kwargs), stream=True,
                stream_options={"include_usage": True}, **self._request_params(stop, kwargs))
            async for event in events:
                chunk = self._chunk(event)
                if chunk is not None:
                    if run_manager:
                        await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk
