"""Context-aware decoding (CAD) over an unmodified vLLM OpenAI server.

CAD (Shi et al., 2023) picks each token by ``(1 + alpha) log p(. | context, question) -
alpha log p(. | question)``: the context's influence is amplified by contrast with the same model
without it. vLLM computes one stream per request, so the two streams are two requests per step
on ``/v1/completions`` with token-id prompts (prefix caching reuses what earlier steps computed):

1. the prompt *with* the context and the tokens so far, one token, ``logprobs = K``
   (``return_tokens_as_token_ids``): the K most likely next tokens are the candidates;
2. the prompt *without* the context and the same tokens, one token, ``logprob_token_ids`` = the
   candidates: their exact log-probabilities without the context;

the candidate with the highest CAD score is appended to both streams. **The approximation**: the
winner is searched among the K most likely tokens *with* the context (``candidates``, at most the
server's ``--max-logprobs``, 20 by default), where CAD in transformers searches the whole
vocabulary; both log-probabilities of every candidate are exact. A token outside the top K with
the context wins only when the context makes it far less likely than without it.

:func:`cad_steps` is the decoding loop written without I/O: it yields the requests to send and
receives their answers, so :class:`CadClient` drives it with a synchronous and an asynchronous
HTTP client alike, and tests can drive it with anything.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import IrcanError

DEFAULT_CANDIDATES = 20
"""Candidates per step: vLLM's default ``--max-logprobs``."""


@dataclass
class Step:
    """One request of a CAD step: a completion of one token after ``prompt`` (token ids)."""

    prompt: list[int]
    logprobs: int
    token_ids: list[int] | None = None
    """With these, the log-probabilities of exactly these tokens (``logprob_token_ids``)."""

    def body(self, model: str) -> dict[str, Any]:
        """The ``/v1/completions`` request body."""
        out: dict[str, Any] = {"model": model, "prompt": self.prompt, "max_tokens": 1, "temperature": 0,
                               "logprobs": self.logprobs, "return_tokens_as_token_ids": True}
        if self.token_ids is not None:
            out["logprob_token_ids"] = self.token_ids
        return out


@dataclass
class CadResult:
    """What CAD generated."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    """``stop`` (an end-of-sequence token), ``length`` (max tokens or the model's length)."""
    changed: int = 0
    """Steps where CAD chose another token than the prompt with the context alone would have."""


def token_logprobs(response: dict[str, Any]) -> dict[int, float]:
    """token id -> log-probability from a one-token completion's ``top_logprobs``
    (``token_id:N`` keys, as ``return_tokens_as_token_ids`` writes them)."""
    choice = response["choices"][0]
    logprobs = choice.get("logprobs") or {}
    tops = logprobs.get("top_logprobs") or []
    if not tops or not tops[0]:
        raise IrcanError("the model server returned no logprobs: CAD needs an OpenAI-compatible completions "
                         "endpoint that returns them (vLLM does); check that it serves /v1/completions with "
                         "logprobs")
    return {int(key.split(":", 1)[1]): float(value) for key, value in tops[0].items() if key.startswith("token_id:")}


def cad_choice(with_context: dict[int, float], without_context: dict[int, float], alpha: float,
               order: Sequence[int]) -> int:
    """The candidate with the highest ``(1 + alpha) * with - alpha * without``; ties go to the
    candidate more likely with the context (``order``: best first)."""
    rank = {t: i for i, t in enumerate(order)}
    return max(with_context, key=lambda t: ((1 + alpha) * with_context[t] - alpha * without_context[t], -rank[t]))


def cad_steps(with_ids: Sequence[int], without_ids: Sequence[int], alpha: float, max_tokens: int,
              eos_ids: set[int], result: CadResult, candidates: int = DEFAULT_CANDIDATES
              ) -> Generator[Step, dict[str, Any], None]:
    """The CAD loop without I/O: send each yielded :class:`Step`, then ``send`` back its JSON
    response. Chosen tokens are appended to ``result`` as they are chosen (a with-context step
    following a step means one more token), so a caller can stream them."""
    if alpha < 0:
        raise IrcanError(f"cad_alpha must be >= 0 (0 is plain greedy decoding), got {alpha}")
    if max_tokens < 1:
        raise IrcanError(f"max_tokens must be >= 1 for CAD, got {max_tokens}")
    for _ in range(max_tokens):
        generated = result.token_ids
        ranked = token_logprobs((yield Step([*with_ids, *generated], candidates)))
        order = sorted(ranked, key=lambda t: -ranked[t])[:candidates]
        without = token_logprobs((yield Step([*without_ids, *generated], len(order), order)))
        missing = [t for t in order if t not in without]
        if missing:
            raise IrcanError(f"the model server returned no logprobs for tokens {missing[:5]} without the context; "
                             "CAD needs vLLM's logprob_token_ids (vLLM 0.11 or newer)")
        token = cad_choice({t: ranked[t] for t in order}, without, alpha, order)
        result.changed += int(token != order[0])
        if token in eos_ids:
            result.finish_reason = "stop"
            return
        generated.append(token)
    result.finish_reason = "length"


@dataclass
class Call:
    """What a CAD session needs next: a POST to the server (``path``, JSON ``body``), or a piece of
    text to hand to the caller (``emit``)."""

    path: str = ""
    body: dict[str, Any] = field(default_factory=dict)
    emit: str | None = None


class _Text:
    """The generated text so far, cut at the first stop sequence; deltas hold back a trailing
    partial UTF-8 character (the detokenizer writes U+FFFD until its last byte arrives)."""

    def __init__(self, stop: Sequence[str] | None) -> None:
        self.stop = [s for s in stop or [] if s]
        self.text = ""
        self.sent = 0
        self.stopped = False

    def update(self, text: str, final: bool = False) -> str:
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:
            text, self.stopped = text[: min(hits)], True
        self.text = text
        end = len(text) if final or self.stopped else len(text.rstrip("\ufffd"))
        delta, self.sent = text[self.sent:end], max(self.sent, end)
        return delta


def cad_session(model: str, with_input: str | list[dict[str, str]], without_input: str | list[dict[str, str]],
                alpha: float, max_tokens: int, eos_ids: set[int], result: CadResult, *,
                stop: Sequence[str] | None = None, candidates: int = DEFAULT_CANDIDATES
                ) -> Generator[Call, Any, None]:
    """One CAD generation as a sequence of :class:`Call` s: tokenize both prompts (``/tokenize``,
    chat messages through the model's chat template), run :func:`cad_steps` on
    ``/v1/completions``, detokenize as tokens come (``/detokenize``) and emit the text."""
    ids = []
    for given in (with_input, without_input):
        body = ({"model": model, "prompt": given} if isinstance(given, str)
                else {"model": model, "messages": given, "add_generation_prompt": True})
        ids.append(list((yield Call("/tokenize", body))["tokens"]))
    text = _Text(stop)
    steps = cad_steps(ids[0], ids[1], alpha, max_tokens, eos_ids, result, candidates)
    step = next(steps)
    while True:
        response = yield Call("/v1/completions", step.body(model))
        try:
            step = steps.send(response)
        except StopIteration:
            break
        if step.token_ids is None:  # one more token: its text
            detok = yield Call("/detokenize", {"model": model, "tokens": result.token_ids})
            delta = text.update(detok["prompt"])
            if delta:
                yield Call(emit=delta)
            if text.stopped:
                result.finish_reason = "stop"
                return
    if result.token_ids:
        detok = yield Call("/detokenize", {"model": model, "tokens": result.token_ids})
        delta = text.update(detok["prompt"], final=True)
        if delta:
            yield Call(emit=delta)


def _server_root(base_url: str) -> str:
    """``http://host:port`` of an OpenAI base URL (``http://host:port/v1``): vLLM serves
    ``/tokenize`` and ``/detokenize`` there, not under ``/v1``."""
    root = str(base_url).rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def _refused(error: Exception, candidates: int) -> BaseException | None:
    """An :class:`IrcanError` saying what to do for a request vLLM refused, or None to re-raise."""
    message = str(error)
    if "max allowed" in message and "logprobs" in message:
        return IrcanError(f"the server caps logprobs below the {candidates} CAD candidates ({message}); pass "
                          f"cad_candidates at most that cap, or start the server with --max-logprobs {candidates}")
    return None


class CadClient:
    """CAD on one vLLM server through its OpenAI clients (``openai.OpenAI`` for :meth:`stream`,
    ``openai.AsyncOpenAI`` for :meth:`astream`); errors stay ``openai`` exception types."""

    def __init__(self, model: str, alpha: float, eos_ids: Sequence[int], *, client: Any = None,
                 async_client: Any = None, candidates: int = DEFAULT_CANDIDATES) -> None:
        if alpha < 0:
            raise IrcanError(f"cad_alpha must be >= 0 (0 is plain greedy decoding), got {alpha}")
        if not candidates >= 1:
            raise IrcanError(f"cad_candidates must be at least 1, got {candidates}")
        if not eos_ids:
            raise IrcanError("CAD needs the model's end-of-sequence token ids to know where to stop")
        self.model, self.alpha, self.eos_ids, self.candidates = model, alpha, set(eos_ids), candidates
        self.client, self.async_client = client, async_client

    def _session(self, with_input: Any, without_input: Any, max_tokens: int, stop: Sequence[str] | None,
                 result: CadResult) -> Generator[Call, Any, None]:
        return cad_session(self.model, with_input, without_input, self.alpha, max_tokens, self.eos_ids, result,
                           stop=stop, candidates=self.candidates)

    def _url(self, client: Any, path: str) -> str:
        return _server_root(client.base_url) + path

    def _calls(self, with_input: Any, without_input: Any, max_tokens: int, stop: Sequence[str] | None,
               result: CadResult) -> Generator[Call, Any, None]:
        """The session's calls, with a refused request turned into an answer: a prompt that reached
        the model's length ends the generation ("length"); a logprobs cap says how to lift it."""
        session = self._session(with_input, without_input, max_tokens, stop, result)
        answer: Any = None
        while True:
            try:
                call = session.send(answer)
            except StopIteration:
                return
            answer = yield call
            if isinstance(answer, Exception):
                if "maximum context length" in str(answer):
                    result.finish_reason = "length"
                    return
                raise _refused(answer, self.candidates) or answer

    def stream(self, with_input: Any, without_input: Any, max_tokens: int, stop: Sequence[str] | None = None,
               result: CadResult | None = None) -> Iterator[str]:
        """The CAD continuation's text, piece by piece (``result`` gets the tokens and finish reason)."""
        import openai

        calls, answer = self._calls(with_input, without_input, max_tokens, stop, result or CadResult()), None
        while (call := _next(calls, answer)) is not None:
            if call.emit is not None:
                answer = None
                yield call.emit
                continue
            try:
                answer = self.client.post(self._url(self.client, call.path), cast_to=object, body=call.body)
            except openai.BadRequestError as e:
                answer = e

    async def astream(self, with_input: Any, without_input: Any, max_tokens: int, stop: Sequence[str] | None = None,
                      result: CadResult | None = None) -> AsyncIterator[str]:
        """:meth:`stream` on the asynchronous client."""
        import openai

        calls, answer = self._calls(with_input, without_input, max_tokens, stop, result or CadResult()), None
        while (call := _next(calls, answer)) is not None:
            answer = None
            if call.emit is None:
                url = self._url(self.async_client, call.path)
                try:
                    answer = await self.async_client.post(url, cast_to=object, body=call.body)
                except openai.BadRequestError as e:
                    answer = e
            else:
                yield call.emit


def _next(calls: Generator[Call, Any, None], answer: Any) -> Call | None:
    """The next call of a session after ``answer``, or None once it is over."""
    try:
        return calls.send(answer)
    except StopIteration:
        return None
