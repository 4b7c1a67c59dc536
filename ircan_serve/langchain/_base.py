"""What the string LLM and the chat model share: fields, OpenAI clients, request parameters,
error translation and the RAG context slot."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from langchain_core.utils import from_env, secret_from_env
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, model_validator

from ..data import PromptTemplate
from ..errors import IrcanError


import httpx
import openai


class IrcanConnectionError(IrcanError, openai.APIConnectionError):
    """The server could not be reached, or the connection broke mid-response.

    A subclass of :class:`openai.APIConnectionError` (and of :class:`IrcanError`), so LangChain's
    ``with_retry(retry_if_exception_type=(openai.APIConnectionError,))`` matches it.
    """

    def __init__(self, message: str, request: httpx.Request) -> None:
        openai.APIConnectionError.__init__(self, message=message, request=request)


class IrcanTimeoutError(IrcanConnectionError, openai.APITimeoutError):
    """The server did not answer within ``timeout`` (an :class:`openai.APITimeoutError`)."""


def _request(e: BaseException, base_url: str) -> httpx.Request:
    request = getattr(e, "request", None)
    try:
        return request if isinstance(request, httpx.Request) else httpx.Request("POST", base_url)
    except RuntimeError:  # httpx raises when an error has no request attached
        return httpx.Request("POST", base_url)


@contextmanager
def translate_errors(base_url: str) -> Iterator[None]:
    """Give the OpenAI client's connection and timeout errors (and a connection that breaks while a
    response streams) a message that says what to do, keeping them ``openai`` exception types."""
    try:
        yield
    except IrcanConnectionError:
        raise
    except openai.APITimeoutError as e:
        raise IrcanTimeoutError(
            f"the model server at {base_url} did not answer in time; raise `timeout` or check the server",
            _request(e, base_url)) from e
    except openai.APIConnectionError as e:
        raise IrcanConnectionError(
            f"could not reach the model server at {base_url}: is `ircan serve` running there?",
            _request(e, base_url)) from e
    except httpx.TransportError as e:  # e.g. the server died mid-stream
        raise IrcanConnectionError(
            f"the connection to the model server at {base_url} broke ({type(e).__name__}: {e}): "
            "is `ircan serve` still running there?", _request(e, base_url)) from e


class IrcanClientParams(BaseModel):
    """Connection and sampling fields of both wrappers."""

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    model: str = Field(alias="model_name")
    """Served model name (``ircan serve`` prints it; the manifest's ``served_model_name``)."""
    base_url: str = Field(
        default_factory=from_env("IRCAN_BASE_URL", default="http://127.0.0.1:8000/v1")
    )
    """OpenAI base URL of the vLLM server (env ``IRCAN_BASE_URL``)."""
    api_key: SecretStr | None = Field(default_factory=secret_from_env("IRCAN_API_KEY", default=None))
    """Bearer token, if the server was started with ``--api-key`` (env ``IRCAN_API_KEY``)."""
    temperature: float = 0.0
    """Sampling temperature (0: greedy, the setting IRCAN is evaluated with)."""
    max_tokens: int | None = 256
    """Most tokens to generate."""
    timeout: float | None = 60.0
    """Seconds to wait for one request."""
    stop: list[str] | None = None
    """Stop sequences applied to every call (merged with per-call ``stop``)."""
    max_retries: int = 2
    """Retries on connection errors and 5xx answers (with back-off, by the OpenAI client)."""
    extra_body: dict[str, Any] | None = None
    """Extra vLLM sampling parameters, e.g. ``{"top_k": 5, "repetition_penalty": 1.1}``."""
    prompt_template: PromptTemplate | None = None
    """Template of the RAG context slot (``invoke(question, context=...)``); from the manifest."""

    _client: Any = PrivateAttr(default=None)
    _async_client: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _make_clients(self) -> "IrcanClientParams":
        import openai

        common = dict(
            base_url=self.base_url,
            api_key=self.api_key.get_secret_value() if self.api_key else "EMPTY",
            timeout=self.timeout,
            max_retries=self.max_retries,
        )
        self._client = openai.OpenAI(**common)
        self._async_client = openai.AsyncOpenAI(**common)
        return self

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, base_url: str, **kwargs: Any) -> Any:
        """A wrapper for the server of an exported checkpoint: model name and template from its manifest."""
        from ..export import Manifest

        manifest = Manifest.load(checkpoint)
        return cls(model=manifest.served_model_name, base_url=base_url,
                   prompt_template=manifest.prompt_template, **kwargs)

    def _request_params(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Per-call parameters: the fields, overridden by ``invoke(..., max_tokens=...)`` etc."""
        kwargs = {k: v for k, v in kwargs.items() if k != "context"}
        params: dict[str, Any] = {
            "model": self.model,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        stops = list(self.stop or []) + list(stop or [])
        if stops:
            params["stop"] = stops
        if self.extra_body:
            params["extra_body"] = dict(self.extra_body)
        params.update(kwargs)
        return {k: v for k, v in params.items() if v is not None}

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

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "base_url": self.base_url, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "stop": self.stop}
