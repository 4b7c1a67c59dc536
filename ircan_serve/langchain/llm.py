"""A LangChain string LLM for an exported checkpoint served by ``ircan serve``: langchain-openai's
``OpenAI`` (completions) pointed at vLLM, plus the checkpoint's RAG context slot."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LangSmithParams
from langchain_core.outputs import GenerationChunk, LLMResult
from langchain_openai import OpenAI
from pydantic import Field

from ._base import IrcanEndpoint, aguarded, guarded, translate_errors


class IrcanLLM(IrcanEndpoint, OpenAI):  # type: ignore[misc]
    """Completion model served by ``ircan serve`` (vLLM's OpenAI ``/v1/completions``).

    A subclass of langchain-openai's ``OpenAI``: ``batch`` sends its prompts in one request
    (``batch_size`` per request, vLLM batches them), and ``logprobs``, ``n``, ``seed``, ``top_p``,
    usage, streaming, async and serialization work as there. Errors are ``openai`` exceptions.

    Instantiate:
        .. code-block:: python

            from ircan_serve.langchain import IrcanLLM
            llm = IrcanLLM.from_checkpoint(
                "export/out/smollm2-conflicts", base_url="http://127.0.0.1:8000/v1",
                max_tokens=16, stop=["\\n"],
            )

    Invoke:
        .. code-block:: python

            llm.invoke("Question: What is the capital of France?\\nAnswer:")
            # the RAG context slot, formatted with the checkpoint's template:
            llm.invoke("What is the capital of France?", context="The capital of France is Lyon.")
            llm.batch(["1 + 1 =", "The sky is"])
    """

    temperature: float = 0.0
    """Sampling temperature (0: greedy, the setting IRCAN is evaluated with)."""
    request_timeout: float | tuple[float, float] | Any | None = Field(default=60.0, alias="timeout")
    """Seconds to wait for one request."""

    @property
    def _llm_type(self) -> str:
        return "ircan-vllm"

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        return ["ircan_serve", "langchain", "llm"]

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "ircan"
        return params

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        context = kwargs.pop("context", None)
        texts = [self._with_context(p, context) for p in prompts]
        with translate_errors(self.openai_api_base):
            return super()._generate(texts, stop=stop, run_manager=run_manager, **kwargs)

    async def _agenerate(self, prompts: list[str], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        context = kwargs.pop("context", None)
        texts = [self._with_context(p, context) for p in prompts]
        with translate_errors(self.openai_api_base):
            return await super()._agenerate(texts, stop=stop, run_manager=run_manager, **kwargs)

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        prompt = self._with_context(prompt, kwargs.pop("context", None))
        yield from guarded(self.openai_api_base,
                           super()._stream(prompt, stop=stop, run_manager=run_manager, **kwargs))

    async def _astream(self, prompt: str, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        prompt = self._with_context(prompt, kwargs.pop("context", None))
        async for chunk in aguarded(self.openai_api_base,
                                    super()._astream(prompt, stop=stop, run_manager=run_manager, **kwargs)):
            yield chunk
