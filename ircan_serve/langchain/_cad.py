"""Context-aware decoding from the LangChain wrappers: ``cad_alpha`` routes generation through
:class:`~ircan_serve.serving.cad.CadClient` (two streams per token on the same vLLM server).

The wrappers put the question and the context into the checkpoint's template twice, with the
context and without it (``invoke(question, context=...)``); everything else (streaming, async,
batch, stop sequences, ``max_tokens``, callbacks, ``openai`` errors) works as without CAD.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from pydantic import Field

from ..errors import IrcanError
from ..serving.cad import DEFAULT_CANDIDATES, DEFAULT_LOOKAHEAD, MAX_TOKEN_IDS, CadClient, CadResult

CadInput = str | list[dict[str, str]]
"""A prompt text (completions) or chat messages (the server applies the chat template)."""


class CadDecoding:
    """The CAD fields and generation loops of :class:`~ircan_serve.langchain._base.IrcanEndpoint`.

    A wrapper supplies :meth:`_cad_pair` (its input, with and without the context) and
    :meth:`_cad_output` / :meth:`_cad_chunk` (LangChain's result types for it)."""

    cad_alpha: float | None = Field(default=None, ge=0)
    """Context-aware decoding: ``(1 + a) log p(.|context) - a log p(.|no context)`` per token
    (None: plain decoding). Needs the context slot (``invoke(question, context=...)``)."""
    cad_candidates: int = Field(default=DEFAULT_CANDIDATES, ge=1, le=MAX_TOKEN_IDS)
    """Tokens CAD chooses among per step: the most likely with the context (at most the server's
    ``--max-logprobs``, 20 by default)."""
    cad_lookahead: int = Field(default=DEFAULT_LOOKAHEAD, ge=1)
    """Draft tokens per CAD round (two requests verify a greedy draft; 1: two requests per
    token). Changes the number of requests, never the tokens."""
    cad_eos_token_ids: list[int] | None = None
    """Where CAD stops: the model's end-of-sequence ids (``from_checkpoint`` reads them; else they
    are read from the served model's folder when it is on this machine)."""

    def _cad_pair(self, inputs: Any, context: str | None) -> tuple[CadInput, CadInput]:
        raise NotImplementedError

    def _cad_output(self, texts: list[tuple[str, CadResult]]) -> Any:
        raise NotImplementedError

    def _cad_chunk(self, text: str) -> Any:
        raise NotImplementedError

    _cad: CadClient | None
    """The CAD client, made on first use (a private attribute of each wrapper class)."""

    def _cad_client(self) -> CadClient:
        if self._cad is None:
            import openai

            endpoint: Any = self
            key = endpoint.openai_api_key.get_secret_value() if endpoint.openai_api_key else "EMPTY"
            common = {"base_url": endpoint.openai_api_base, "api_key": key, "timeout": endpoint.request_timeout,
                      "max_retries": endpoint.max_retries or 0}
            sync, asyn = openai.OpenAI(**common), openai.AsyncOpenAI(**common)
            eos = self.cad_eos_token_ids or self._served_eos(sync, endpoint.model_name)
            self._cad = CadClient(endpoint.model_name, self.cad_alpha or 0.0, eos, client=sync, async_client=asyn,
                                  candidates=self.cad_candidates, lookahead=self.cad_lookahead)
        return self._cad

    @staticmethod
    def _served_eos(client: Any, model: str) -> list[int]:
        """The served model's end-of-sequence ids, from its folder (``/v1/models`` names it) where
        that folder is on this machine."""
        from ..checkpoint.manifest import eos_token_ids

        for entry in client.models.list().data:
            root = getattr(entry, "root", None)
            if entry.id == model and root and eos_token_ids(root):
                return eos_token_ids(root)
        raise IrcanError(f"CAD needs the end-of-sequence token ids of {model!r}, and the server's model folder is "
                         "not on this machine: build the wrapper with from_checkpoint(...) or pass "
                         "cad_eos_token_ids=[...]")

    def _cad_limits(self, stop: Sequence[str] | None) -> tuple[int, list[str]]:
        endpoint: Any = self
        extra = getattr(endpoint, "model_kwargs", None) or {}
        stops = list(stop or getattr(endpoint, "stop", None) or extra.get("stop") or [])
        return int(endpoint.max_tokens or 256), stops

    def _cad_inputs(self, inputs: Any, context: str | None) -> list[tuple[CadInput, CadInput]]:
        if context is None:
            raise IrcanError("CAD compares the prompt with the context and without it: pass the context "
                             "(invoke(question, context=...)) or set cad_alpha=None")
        many = inputs if isinstance(inputs, list) and inputs and isinstance(inputs[0], str) else [inputs]
        return [self._cad_pair(one, context) for one in many]

    def _cad_generate(self, inputs: Any, context: str | None, stop: Sequence[str] | None, run_manager: Any) -> Any:
        max_tokens, stops = self._cad_limits(stop)
        out = []
        for with_input, without_input in self._cad_inputs(inputs, context):
            result = CadResult()
            text = ""
            for delta in self._cad_client().stream(with_input, without_input, max_tokens, stops, result):
                text += delta
                if run_manager:
                    run_manager.on_llm_new_token(delta)
            out.append((text, result))
        return self._cad_output(out)

    async def _cad_agenerate(self, inputs: Any, context: str | None, stop: Sequence[str] | None,
                             run_manager: Any) -> Any:
        max_tokens, stops = self._cad_limits(stop)
        import asyncio

        async def one(with_input: CadInput, without_input: CadInput) -> tuple[str, CadResult]:
            result = CadResult()
            pieces = []
            async for delta in self._cad_client().astream(with_input, without_input, max_tokens, stops, result):
                pieces.append(delta)
                if run_manager:
                    await run_manager.on_llm_new_token(delta)
            return "".join(pieces), result

        pairs = self._cad_inputs(inputs, context)
        return self._cad_output(list(await asyncio.gather(*(one(w, wo) for w, wo in pairs))))

    def _cad_stream(self, inputs: Any, context: str | None, stop: Sequence[str] | None, run_manager: Any) -> Iterator[Any]:
        max_tokens, stops = self._cad_limits(stop)
        ((with_input, without_input),) = self._cad_inputs(inputs, context)
        for delta in self._cad_client().stream(with_input, without_input, max_tokens, stops):
            chunk = self._cad_chunk(delta)
            if run_manager:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk

    async def _cad_astream(self, inputs: Any, context: str | None, stop: Sequence[str] | None,
                           run_manager: Any) -> AsyncIterator[Any]:
        max_tokens, stops = self._cad_limits(stop)
        ((with_input, without_input),) = self._cad_inputs(inputs, context)
        async for delta in self._cad_client().astream(with_input, without_input, max_tokens, stops):
            chunk = self._cad_chunk(delta)
            if run_manager:
                await run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
