"""A LangChain string LLM for an exported checkpoint served by ``ircan serve``: langchain-openai's
``OpenAI`` (completions) pointed at vLLM, plus the checkpoint's RAG context slot."""

from __future__ import annotations

from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from langchain_openai import OpenAI
from pydantic import PrivateAttr

from ..serving.cad import CadClient, CadResult
from ._base import IrcanEndpoint


class IrcanLLM(IrcanEndpoint, OpenAI):  # type: ignore[misc]  # the mixin's fields redefine the base's
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

    _cad: CadClient | None = PrivateAttr(default=None)
    stop: list[str] | None = None
    """Stop sequences for every request (a ``stop`` given to a call replaces them)."""
    temperature: float = 0.0
    """Sampling temperature (0: greedy, the setting IRCAN is evaluated with)."""

    @property
    def _llm_type(self) -> str:
        return "ircan-vllm"

    def _with_slot(self, prompts: str | list[str], context: str | None) -> str | list[str]:
        """The prompt (or each of a batch's prompts) with the context slot filled."""
        if isinstance(prompts, str):
            return self._with_context(prompts, context)
        return [self._with_context(p, context) for p in prompts]

    def _cad_pair(self, prompt: str, context: str | None) -> tuple[str, str]:
        """The prompt with the context and without it, as the checkpoint's template writes them."""
        template = self._template_for_cad()
        return template.render(prompt, context), template.render(prompt)

    def _cad_output(self, texts: list[tuple[str, CadResult]]) -> LLMResult:
        return LLMResult(generations=[[Generation(text=text, generation_info={
            "finish_reason": result.finish_reason, "cad_changed_tokens": result.changed})] for text, result in texts],
            llm_output={"model_name": self.model_name, "cad_alpha": self.cad_alpha})

    def _cad_chunk(self, text: str) -> GenerationChunk:
        return GenerationChunk(text=text)
