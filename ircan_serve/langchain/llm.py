"""A LangChain string LLM over the vLLM completions endpoint of an exported checkpoint."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LangSmithParams
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

from ..errors import IrcanError
from ._base import IrcanClientParams, translate_errors


class IrcanLLM(IrcanClientParams, LLM):
    """Completion model served by ``ircan serve`` (vLLM's OpenAI ``/v1/completions``).

    Setup:
        .. code-block:: bash

            pip install ircan-serve[cpu]      # or [gpu]
            ircan export export/smollm2-conflicts.toml
            ircan serve export/out/smollm2-conflicts --port 8000

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
            await llm.ainvoke("The sky is")

    Stream:
        .. code-block:: python

            for chunk in llm.stream("Once upon a time"):
                print(chunk, end="", flush=True)
    """

    @property
    def _llm_type(self) -> str:
        return "ircan-vllm"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = self._request_params(stop, kwargs)
        return LangSmithParams(
            ls_provider="ircan", ls_model_name=params["model"], ls_model_type="llm",
            ls_temperature=params.get("temperature"), ls_max_tokens=params.get("max_tokens"),
            ls_stop=params.get("stop"),
        )

    def _result(self, response: Any, n_prompts: int) -> LLMResult:
        choices = sorted(response.choices, key=lambda c: c.index)
        if len(choices) != n_prompts:
            raise IrcanError(f"the server answered {len(choices)} completions for {n_prompts} prompts")
        return LLMResult(
            generations=[[Generation(text=c.text, generation_info={"finish_reason": c.finish_reason})]
                         for c in choices],
            llm_output={"model_name": response.model},
        )

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        """All prompts in one ``/v1/completions`` request (vLLM batches them), so ``batch`` is not
        one round trip per prompt."""
        context = kwargs.get("context")
        texts = [self._with_context(p, context) for p in prompts]
        with translate_errors(self.base_url):
            response = self._client.completions.create(prompt=texts, **self._request_params(stop, kwargs))
        return self._result(response, len(texts))

    async def _agenerate(self, prompts: list[str], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        context = kwargs.get("context")
        texts = [self._with_context(p, context) for p in prompts]
        with translate_errors(self.base_url):
            response = await self._async_client.completions.create(prompt=texts, **self._request_params(stop, kwargs))
        return self._result(response, len(texts))

    def _call(self, prompt: str, stop: list[str] | None = None,
              run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        prompt = self._with_context(prompt, kwargs.get("context"))
        with translate_errors(self.base_url):
            response = self._client.completions.create(prompt=prompt, **self._request_params(stop, kwargs))
        return response.choices[0].text

    async def _acall(self, prompt: str, stop: list[str] | None = None,
                     run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        prompt = self._with_context(prompt, kwargs.get("context"))
        with translate_errors(self.base_url):
            response = await self._async_client.completions.create(
                prompt=prompt, **self._request_params(stop, kwargs))
        return response.choices[0].text

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        prompt = self._with_context(prompt, kwargs.get("context"))
        with translate_errors(self.base_url):
            empty = True
            for event in self._client.completions.create(
                prompt=prompt, stream=True, **self._request_params(stop, kwargs)
            ):
                if event.choices and event.choices[0].text:
                    empty = False
                    chunk = GenerationChunk(text=event.choices[0].text)
                    if run_manager:
                        run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk
            if empty:  # an empty completion is a valid answer: stream it as ""
                yield GenerationChunk(text="")

    async def _astream(self, prompt: str, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        prompt = self._with_context(prompt, kwargs.get("context"))
        with translate_errors(self.base_url):
            stream = await self._async_client.completions.create(
                prompt=prompt, stream=True, **self._request_params(stop, kwargs))
            empty = True
            async for event in stream:
                if event.choices and event.choices[0].text:
                    empty = False
                    chunk = GenerationChunk(text=event.choices[0].text)
                    if run_manager:
                        await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk
            if empty:
                yield GenerationChunk(text="")
