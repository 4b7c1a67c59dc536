"""What the string LLM and the chat model add to their ``langchain-openai`` bases: the defaults
for a local ``ircan serve`` endpoint, ``from_checkpoint``, the RAG context slot rendered with the
checkpoint's :class:`~ircan_serve.prompts.PromptTemplate`, and connection errors that say what
to do while staying ``openai`` exception types.

:class:`IrcanEndpoint` is mixed in before the langchain-openai base and overrides its four
generation paths (sync, async, stream, async stream) once for both wrappers: each fills the
context slot (:meth:`IrcanEndpoint._with_slot`, the one method each wrapper defines for its input
type) and translates errors, then hands over to the base.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
from langchain_core.language_models import LangSmithParams
from langchain_core.utils import from_env, secret_from_env
from pydantic import Field, SecretStr

from ..errors import IrcanError
from ..prompts import PromptTemplate
from ._cad import CadDecoding

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


class IrcanConnectionError(IrcanError, openai.APIConnectionError):
    """The server could not be reached, or the connection broke mid-response.

    A subclass of :class:`openai.APIConnectionError` (and of :class:`IrcanError`), so LangChain's
    ``with_retry(retry_if_exception_type=(openai.APIConnectionError,))`` matches it.
    """

    def __init__(self, message: str, request: Any) -> None:
        openai.APIConnectionError.__init__(self, message=message, request=request)


class IrcanTimeoutError(IrcanConnectionError, openai.APITimeoutError):
    """The server did not answer within ``timeout`` (an :class:`openai.APITimeoutError`)."""


def _request(e: BaseException, base_url: str) -> Any:
    request = getattr(e, "request", None)
    try:
        return request if isinstance(request, httpx.Request) else httpx.Request("POST", base_url)
    except RuntimeError:  # httpx raises when an error has no request attached
        return httpx.Request("POST", base_url)


@contextmanager
def translate_errors(base_url: str | None) -> Iterator[None]:
    """Give the OpenAI client's connection and timeout errors (and a connection that breaks while a
    response streams) a message that says what to do, keeping them ``openai`` exception types."""
    url = base_url or DEFAULT_BASE_URL
    try:
        yield
    except IrcanConnectionError:
        raise
    except openai.APITimeoutError as e:
        raise IrcanTimeoutError(
            f"the model server at {url} did not answer in time; raise `timeout` or check the server",
            _request(e, url)) from e
    except openai.APIConnectionError as e:
        raise IrcanConnectionError(
            f"could not reach the model server at {url}: is `ircan serve` running there?", _request(e, url)) from e
    except httpx.TransportError as e:  # e.g. the server died mid-stream
        raise IrcanConnectionError(
            f"the connection to the model server at {url} broke ({type(e).__name__}: {e}): "
            "is `ircan serve` still running there?", _request(e, url)) from e


def guarded(base_url: str | None, chunks: Iterator[Any]) -> Iterator[Any]:
    """``chunks`` with connection errors translated while they stream."""
    with translate_errors(base_url):
        yield from chunks


async def aguarded(base_url: str | None, chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
    with translate_errors(base_url):
        async for chunk in chunks:
            yield chunk


class IrcanEndpoint(CadDecoding):
    """Fields and helpers shared by :class:`~ircan_serve.langchain.ChatIrcan` and
    :class:`~ircan_serve.langchain.IrcanLLM` (mixed in before their ``langchain-openai`` base)."""

    openai_api_base: str | None = Field(
        default_factory=from_env("IRCAN_BASE_URL", default=DEFAULT_BASE_URL), alias="base_url")
    """OpenAI base URL of the vLLM server (env ``IRCAN_BASE_URL``)."""
    openai_api_key: SecretStr | None = Field(
        default_factory=secret_from_env("IRCAN_API_KEY", default="EMPTY"), alias="api_key")
    """Bearer token, if the server requires one (env ``IRCAN_API_KEY``)."""
    prompt_template: PromptTemplate | None = None
    """Template of the RAG context slot (``invoke(question, context=...)``); from the manifest."""
    request_timeout: float | tuple[float, float] | Any | None = Field(default=60.0, alias="timeout")
    """Seconds to wait for one request."""

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        """LangChain serialization path: the wrapper's module (``ircan_serve.langchain.chat``)."""
        return cls.__module__.split(".")

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params: LangSmithParams = super()._get_ls_params(stop=stop, **kwargs)  # type: ignore[misc]  # a mixin
        params["ls_provider"] = "ircan"
        return params

    def to_json(self) -> Any:
        """LangChain serialization: the template as plain data, the key as ``IRCAN_API_KEY``."""
        data = super().to_json()  # type: ignore[misc]  # a mixin: super() is the langchain-openai base
        kwargs = data.get("kwargs") if isinstance(data, dict) else None
        if isinstance(kwargs, dict):
            if isinstance(kwargs.get("prompt_template"), PromptTemplate):
                kwargs["prompt_template"] = kwargs["prompt_template"].model_dump()
            key = kwargs.get("openai_api_key")
            if isinstance(key, dict) and key.get("type") == "secret":
                key["id"] = ["IRCAN_API_KEY"]
        return data

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, base_url: str, **kwargs: Any) -> Any:
        """A wrapper for the server of an exported checkpoint: model name and template from its manifest."""
        from ..checkpoint.manifest import Manifest, eos_token_ids

        manifest = Manifest.load(checkpoint)
        kwargs.setdefault("cad_eos_token_ids", eos_token_ids(checkpoint) or None)
        kwargs.setdefault("prompt_template", manifest.prompt_template)
        return cls(model=manifest.served_model_name, base_url=base_url, **kwargs)  # type: ignore[call-arg]  # aliases

    def _template_for_cad(self) -> PromptTemplate:
        if self.prompt_template is None:
            raise IrcanError("CAD renders the prompt with and without the context, so it needs the checkpoint's "
                             "prompt_template: build the wrapper with from_checkpoint(...) or pass prompt_template")
        return self.prompt_template

    def _with_context(self, question: str, context: str | None) -> str:
        """The RAG prompt for ``question``: the template's context slot filled, if a context is given."""
        if context is None:
            return question
        if self.prompt_template is None:
            raise IrcanError(
                "a context was given but no prompt_template is set: build the wrapper with "
                "from_checkpoint(...) or pass prompt_template=QA_TEMPLATE"
            )
        return self.prompt_template.render(question=question, context=context)

    def _with_slot(self, inputs: Any, context: str | None) -> Any:
        """The wrapper's input with the context slot filled (prompts, or chat messages)."""
        raise NotImplementedError

    def _generate(self, inputs: Any, stop: list[str] | None = None, run_manager: Any = None, **kwargs: Any) -> Any:
        context = kwargs.pop("context", None)
        stop = stop or getattr(self, "stop", None)  # the wrapper's own stop sequences, as ChatOpenAI has them
        if self.cad_alpha is not None:
            with translate_errors(self.openai_api_base):
                return self._cad_generate(inputs, context, stop, run_manager)
        inputs = self._with_slot(inputs, context)
        with translate_errors(self.openai_api_base):
            return super()._generate(inputs, stop=stop, run_manager=run_manager, **kwargs)  # type: ignore[misc]  # a mixin: super() is the langchain-openai base

    async def _agenerate(self, inputs: Any, stop: list[str] | None = None, run_manager: Any = None,
                         **kwargs: Any) -> Any:
        context = kwargs.pop("context", None)
        stop = stop or getattr(self, "stop", None)  # the wrapper's own stop sequences, as ChatOpenAI has them
        if self.cad_alpha is not None:
            with translate_errors(self.openai_api_base):
                return await self._cad_agenerate(inputs, context, stop, run_manager)
        inputs = self._with_slot(inputs, context)
        with translate_errors(self.openai_api_base):
            return await super()._agenerate(inputs, stop=stop, run_manager=run_manager, **kwargs)  # type: ignore[misc]  # a mixin: super() is the langchain-openai base

    def _stream(self, inputs: Any, stop: list[str] | None = None, run_manager: Any = None,
                **kwargs: Any) -> Iterator[Any]:
        context = kwargs.pop("context", None)
        stop = stop or getattr(self, "stop", None)  # the wrapper's own stop sequences, as ChatOpenAI has them
        if self.cad_alpha is not None:
            yield from guarded(self.openai_api_base, self._cad_stream(inputs, context, stop, run_manager))
            return
        inputs = self._with_slot(inputs, context)
        yield from guarded(self.openai_api_base,
                           super()._stream(inputs, stop=stop, run_manager=run_manager, **kwargs))  # type: ignore[misc]  # a mixin: super() is the langchain-openai base

    async def _astream(self, inputs: Any, stop: list[str] | None = None, run_manager: Any = None,
                       **kwargs: Any) -> AsyncIterator[Any]:
        context = kwargs.pop("context", None)
        stop = stop or getattr(self, "stop", None)  # the wrapper's own stop sequences, as ChatOpenAI has them
        if self.cad_alpha is not None:
            async for chunk in aguarded(self.openai_api_base, self._cad_astream(inputs, context, stop, run_manager)):
                yield chunk
            return
        inputs = self._with_slot(inputs, context)
        async for chunk in aguarded(self.openai_api_base,
                                    super()._astream(inputs, stop=stop, run_manager=run_manager, **kwargs)):  # type: ignore[misc]  # a mixin: super() is the langchain-openai base
            yield chunk
