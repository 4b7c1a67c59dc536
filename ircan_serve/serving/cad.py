"""Context-aware decoding (CAD) over an unmodified vLLM OpenAI server.

CAD (Shi et al., 2023) picks each token by ``(1 + alpha) log p(. | context, question) -
alpha log p(. | question)``: the context's influence is amplified by contrast with the same model
without it. vLLM computes one stream per request, so the two streams are requests on
``/v1/completions`` with token-id prompts (prefix caching reuses what earlier requests computed),
made in rounds that verify a draft, as speculative decoding does:

1. the prompt *with* the context and the tokens so far, ``lookahead`` tokens of plain greedy
   decoding, ``logprobs = K`` (``return_tokens_as_token_ids``): the draft, and at each of its
   positions the K tokens most likely there, the candidates;
2. the prompt *without* the context and the tokens so far followed by each prefix of the draft,
   all in one request (a list of prompts), one token each, ``logprob_token_ids`` = the
   candidates: their exact log-probabilities without the context, position by position;

at each position the candidate with the highest CAD score is chosen; while it is the draft's
token the next position is valid too (its with-context log-probabilities were computed after that
token), and the first position where CAD chooses otherwise ends the round with CAD's token.
The result is token for token what one pair of requests per token gives (``lookahead = 1``); CAD
mostly agrees with greedy decoding, so a round usually yields several tokens for two requests.

**The approximation**: the winner is searched among the K most likely tokens *with* the context
(``candidates``, at most the server's ``--max-logprobs``, 20 by default), where CAD in
transformers searches the whole vocabulary; both log-probabilities of every candidate are exact.
A token outside the top K with the context wins only when the context makes it far less likely
than without it.

**A vLLM bug it works around** (vLLM 0.32): when a request with ``logprob_token_ids`` shares an
engine step with requests asking for top-K ``logprobs``, those get only their sampled token's
log-probability (and ``token_id:0`` at -9999) instead of their top K; and in a step where several
``logprob_token_ids`` lists differ in length, the shorter ones are padded with token 0 at -inf,
which overwrites a real token 0. So requests of the two kinds from CAD never overlap on one
server (:mod:`~ircan_serve.serving.cad_gate`, shared by every client of that server in this process), every
``logprob_token_ids`` list has the same length (:data:`MAX_TOKEN_IDS`, padded with tokens no one
reads), and a response that still lacks logprobs -- another client's requests mixed in -- is cut
to its complete positions or sent again (``CadResult.retries``).

:func:`cad_steps` is the decoding loop written without I/O: it yields the requests to send and
receives their answers, so :class:`CadClient` drives it with a synchronous and an asynchronous
HTTP client alike, and tests can drive it with anything.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import IrcanError
from .cad_gate import gated

DEFAULT_CANDIDATES = 20
"""Candidates per step: vLLM's default ``--max-logprobs``."""
DEFAULT_LOOKAHEAD = 8
"""Draft tokens per round (1: one pair of requests per token)."""
MAX_TOKEN_IDS = 128
"""vLLM's cap on ``logprob_token_ids`` per request (``MAX_LOGPROB_TOKEN_IDS``); every such list
CAD sends has this length."""
NO_LOGPROB = -9999.0
"""How vLLM writes a log-probability of -inf (a padded entry): not a value."""
MAX_RETRIES = 50
"""Incomplete responses one generation sends again before it gives up."""


@dataclass
class Step:
    """One request of CAD: ``max_tokens`` greedy tokens after ``prompt`` (token ids), or one
    token after each of several prompts (a list of token-id lists) in one request."""

    prompt: list[int] | list[list[int]]
    logprobs: int
    token_ids: list[int] | None = None
    """With these, the log-probabilities of exactly these tokens (``logprob_token_ids``)."""
    max_tokens: int = 1

    def body(self, model: str) -> dict[str, Any]:
        """The ``/v1/completions`` request body."""
        out: dict[str, Any] = {"model": model, "prompt": self.prompt, "max_tokens": self.max_tokens,
                               "temperature": 0, "logprobs": self.logprobs, "return_tokens_as_token_ids": True}
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
    requests: int = 0
    """Completion requests sent (two per token at ``lookahead = 1``)."""
    retries: int = 0
    """Responses that lacked logprobs and were sent again (see the module's vLLM bug)."""


def _token_id(key: str) -> int:
    return int(key.split(":", 1)[1])


def position_logprobs(response: dict[str, Any]) -> list[tuple[list[int], list[dict[int, float]]]]:
    """Per choice (in prompt order): the generated token ids, and at each position token id ->
    log-probability from ``top_logprobs`` (``token_id:N`` keys, as ``return_tokens_as_token_ids``
    writes them)."""
    out = []
    for choice in sorted(response["choices"], key=lambda c: c.get("index", 0)):
        logprobs = choice.get("logprobs") or {}
        tops = logprobs.get("top_logprobs") or []
        if not tops or not tops[0]:
            raise IrcanError("the model server returned no logprobs: CAD needs an OpenAI-compatible completions "
                             "endpoint that returns them (vLLM does); check that it serves /v1/completions with "
                             "logprobs")
        tokens = [_token_id(t) for t in logprobs.get("tokens") or []]
        out.append((tokens, [{_token_id(k): float(v) for k, v in top.items()
                              if k.startswith("token_id:") and float(v) > NO_LOGPROB} for top in tops]))
    return out


def token_logprobs(response: dict[str, Any]) -> dict[int, float]:
    """token id -> log-probability at the first position of a completion's first choice."""
    return position_logprobs(response)[0][1][0]


def cad_choice(with_context: dict[int, float], without_context: dict[int, float], alpha: float,
               order: Sequence[int]) -> int:
    """The candidate with the highest ``(1 + alpha) * with - alpha * without``; ties go to the
    candidate more likely with the context (``order``: best first)."""
    rank = {t: i for i, t in enumerate(order)}
    return max(with_context, key=lambda t: ((1 + alpha) * with_context[t] - alpha * without_context[t], -rank[t]))


def _groups(orders: Sequence[Sequence[int]], cap: int = MAX_TOKEN_IDS) -> Iterator[list[int]]:
    """Consecutive positions whose candidates together fit in one request's ``logprob_token_ids``
    (a position with more candidates than the cap goes alone, for the server to refuse)."""
    group: list[int] = []
    union: set[int] = set()
    for i, order in enumerate(orders):
        if group and len(union | set(order)) > cap:
            yield group
            group, union = [], set()
        group.append(i)
        union |= set(order)
    if group:
        yield group


def _padded(ids: set[int], size: int = MAX_TOKEN_IDS) -> list[int]:
    """``ids`` and then the smallest other ids up to ``size`` (lists of one length are never
    padded by vLLM, whose padding overwrites a real token 0)."""
    filler = (i for i in range(size + len(ids)) if i not in ids)
    return sorted(ids) + [next(filler) for _ in range(size - len(ids))]


def _retry(result: CadResult) -> None:
    result.retries += 1
    if result.retries > MAX_RETRIES:
        raise IrcanError(f"the model server returned logprobs for fewer tokens than asked {result.retries} times. "
                         "vLLM 0.32 does this when a request with logprob_token_ids shares a step with one asking "
                         "for top logprobs; CAD keeps its own two kinds apart, so either another client is sending "
                         "such requests to this server (give CAD a server of its own) or the server ignores "
                         "logprob_token_ids (it needs vLLM 0.11 or newer)")


def cad_steps(with_ids: Sequence[int], without_ids: Sequence[int], alpha: float, max_tokens: int,
              eos_ids: set[int], result: CadResult, candidates: int = DEFAULT_CANDIDATES,
              lookahead: int = DEFAULT_LOOKAHEAD) -> Generator[Step, dict[str, Any], None]:
    """The CAD loop without I/O: send each yielded :class:`Step`, then ``send`` back its JSON
    response. Chosen tokens are appended to ``result`` as they are chosen, so a caller can stream
    them; the tokens do not depend on ``lookahead``, only the number of requests does."""
    if alpha < 0:
        raise IrcanError(f"cad_alpha must be >= 0 (0 is plain greedy decoding), got {alpha}")
    if max_tokens < 1:
        raise IrcanError(f"max_tokens must be >= 1 for CAD, got {max_tokens}")
    if lookahead < 1:
        raise IrcanError(f"cad_lookahead must be >= 1 (1 is one pair of requests per token), got {lookahead}")
    generated = result.token_ids
    while len(generated) < max_tokens:
        size = min(lookahead, max_tokens - len(generated))
        result.requests += 1
        [(draft, ranked)] = position_logprobs((yield Step([*with_ids, *generated], candidates, max_tokens=size)))
        if not draft or len(draft) != len(ranked):
            raise IrcanError("the model server returned no generated tokens with their logprobs; CAD needs "
                             "vLLM's return_tokens_as_token_ids")
        complete = next((i for i, r in enumerate(ranked) if len(r) < candidates), len(ranked))
        if complete == 0:
            _retry(result)
            continue
        draft, orders = draft[:complete], [sorted(r, key=lambda t: -r[t])[:candidates] for r in ranked[:complete]]
        start = list(generated)
        for group in _groups(orders):
            ids = _padded(set().union(*(orders[i] for i in group)))
            while True:
                result.requests += 1
                answers = position_logprobs((yield Step([[*without_ids, *start, *draft[:i]] for i in group],
                                                        len(ids), ids)))
                if all(t in tops[0] for i, (_tokens, tops) in zip(group, answers) for t in orders[i]):
                    break
                _retry(result)
            round_over = False  # CAD left the draft, or max_tokens reached: the next round drafts anew
            for i, (_tokens, tops) in zip(group, answers):
                token = cad_choice({t: ranked[i][t] for t in orders[i]}, tops[0], alpha, orders[i])
                result.changed += int(token != orders[i][0])
                if token in eos_ids:
                    result.finish_reason = "stop"
                    return
                generated.append(token)
                round_over = token != draft[i] or len(generated) >= max_tokens
                if round_over:
                    break
            if round_over:
                break
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
                stop: Sequence[str] | None = None, candidates: int = DEFAULT_CANDIDATES,
                lookahead: int = DEFAULT_LOOKAHEAD) -> Generator[Call, Any, None]:
    """One CAD generation as a sequence of :class:`Call` s: tokenize both prompts (``/tokenize``,
    chat messages through the model's chat template), run :func:`cad_steps` on
    ``/v1/completions``, detokenize as tokens come (``/detokenize``, once per round that chose
    tokens) and emit the text."""
    ids = []
    for given in (with_input, without_input):
        body = ({"model": model, "prompt": given} if isinstance(given, str)
                else {"model": model, "messages": given, "add_generation_prompt": True})
        ids.append(list((yield Call("/tokenize", body))["tokens"]))
    text = _Text(stop)
    steps = cad_steps(ids[0], ids[1], alpha, max_tokens, eos_ids, result, candidates, lookahead)
    step = next(steps)
    shown = 0
    while True:
        response = yield Call("/v1/completions", step.body(model))
        try:
            step = steps.send(response)
        except StopIteration:
            break
        if len(result.token_ids) > shown:  # more tokens: their text
            shown = len(result.token_ids)
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
    if "max allowed" in message and "logprob_token_ids" in message:
        return IrcanError(f"the server scores at most {MAX_TOKEN_IDS} given tokens per request ({message}); pass "
                          f"cad_candidates at most {MAX_TOKEN_IDS}")
    if "max allowed" in message and "logprobs" in message:
        return IrcanError(f"the server caps logprobs below the {candidates} CAD candidates ({message}); pass "
                          f"cad_candidates at most that cap, or start the server with --max-logprobs {candidates}")
    return None


class CadClient:
    """CAD on one vLLM server through its OpenAI clients (``openai.OpenAI`` for :meth:`stream`,
    ``openai.AsyncOpenAI`` for :meth:`astream`); errors stay ``openai`` exception types."""

    def __init__(self, model: str, alpha: float, eos_ids: Sequence[int], *, client: Any = None,
                 async_client: Any = None, candidates: int = DEFAULT_CANDIDATES,
                 lookahead: int = DEFAULT_LOOKAHEAD) -> None:
        if alpha < 0:
            raise IrcanError(f"cad_alpha must be >= 0 (0 is plain greedy decoding), got {alpha}")
        if not candidates >= 1:
            raise IrcanError(f"cad_candidates must be at least 1, got {candidates}")
        if not eos_ids:
            raise IrcanError("CAD needs the model's end-of-sequence token ids to know where to stop")
        if not lookahead >= 1:
            raise IrcanError(f"cad_lookahead must be at least 1, got {lookahead}")
        self.model, self.alpha, self.eos_ids, self.candidates = model, alpha, set(eos_ids), candidates
        self.lookahead = lookahead
        self.client, self.async_client = client, async_client

    def _session(self, with_input: Any, without_input: Any, max_tokens: int, stop: Sequence[str] | None,
                 result: CadResult) -> Generator[Call, Any, None]:
        return cad_session(self.model, with_input, without_input, self.alpha, max_tokens, self.eos_ids, result,
                           stop=stop, candidates=self.candidates, lookahead=self.lookahead)

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
                url = self._url(self.client, call.path)
                with gated(_server_root(self.client.base_url), call.body):
                    answer = self.client.post(url, cast_to=object, body=call.body)
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
                    async with gated(_server_root(self.async_client.base_url), call.body, asynchronous=True):
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
