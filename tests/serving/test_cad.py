"""Context-aware decoding over the OpenAI API, against transformers' CAD on the same model.

A stand-in for vLLM's endpoints (``/tokenize``, ``/v1/completions`` with ``logprobs`` and
``logprob_token_ids``, ``/detokenize``) computes with a tiny transformers model, so the decoding
loop, its stop rules and its errors are tested without a server; the live test against vLLM is in
``test_cad_live.py``.
"""

import asyncio
import json

import httpx2
import openai
import pytest
import torch

from ircan_serve.errors import IrcanError
from ircan_serve.generation import greedy_generate
from ircan_serve.prompts import encode
from ircan_serve.serving.cad import CadClient, CadResult, _groups, _Text, cad_choice, token_logprobs
from ircan_serve.serving.cad_gate import _TaskGate


class FakeVLLM:
    """vLLM's CAD endpoints on a transformers model (greedy drafts, lists of prompts,
    ``logprob_token_ids``); counts requests, can cap logprobs."""

    def __init__(self, model, tokenizer, max_logprobs=20, eos=(0,), max_token_ids=None):
        self.model, self.tokenizer, self.max_logprobs, self.eos = model, tokenizer, max_logprobs, set(eos)
        self.max_token_ids = max_token_ids
        self.requests, self.bodies = [], []
        self.garble = []
        """vLLM 0.32's bug, one entry per coming top-logprobs response: from this position on, only
        the sampled token's log-probability and token 0 at -9999."""

    def _logprobs(self, ids):
        with torch.no_grad():
            return torch.log_softmax(self.model(torch.tensor([ids])).logits[0, -1].double(), -1)

    def _choice(self, index, prompt, k, token_ids, n, garble_from=None):
        ids, tokens, tops = list(prompt), [], []
        for position in range(n):
            lp = self._logprobs(ids)
            token = int(lp.argmax())
            shown = [token] if garble_from is not None and position >= garble_from else (
                token_ids or lp.topk(k).indices.tolist())
            tops.append({f"token_id:{i}": float(lp[i]) for i in shown})
            if len(shown) == 1 and not token_ids:
                tops[-1]["token_id:0"] = -9999.0
            tokens.append(f"token_id:{token}")
            ids.append(token)
            if token in self.eos:
                break
        return {"index": index, "text": "", "logprobs": {"tokens": tokens, "top_logprobs": tops}}

    def __call__(self, request):
        body = json.loads(request.content)
        path = request.url.path
        self.requests.append(path)
        if path == "/tokenize":
            return httpx2.Response(200, json={"tokens": encode(self.tokenizer, body["prompt"])})
        if path == "/detokenize":
            return httpx2.Response(200, json={"prompt": self.tokenizer.decode(body["tokens"])})
        k, token_ids = body["logprobs"], body.get("logprob_token_ids")
        if token_ids and self.max_token_ids and len(token_ids) > self.max_token_ids:
            return httpx2.Response(400, json={"error": {"message": f"Requested logprob_token_ids of length "
                                                        f"{len(token_ids)}, which is greater than max allowed: "
                                                        f"{self.max_token_ids}", "type": "BadRequestError",
                                                        "code": 400}})
        if k > self.max_logprobs and not token_ids:
            return httpx2.Response(400, json={"error": {"message": f"Requested sample logprobs of {k}, which is "
                                                        f"greater than max allowed: {self.max_logprobs}",
                                                        "type": "BadRequestError", "code": 400}})
        self.bodies.append(body)
        prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
        garble_from = self.garble.pop(0) if self.garble and not token_ids else None
        choices = [self._choice(i, p, k, token_ids, body["max_tokens"], garble_from) for i, p in enumerate(prompts)]
        return httpx2.Response(200, json={"choices": choices[::-1]})  # any order: each choice has its index

    def clients(self):
        common = {"base_url": "http://vllm.test/v1", "api_key": "k", "max_retries": 0}
        return (openai.OpenAI(**common, http_client=httpx2.Client(transport=httpx2.MockTransport(self))),
                openai.AsyncOpenAI(**common, http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(self))))


@pytest.fixture
def fake(tiny_llama):
    return FakeVLLM(tiny_llama.model, tiny_llama.tokenizer)


def _cad(fake, alpha=0.5, candidates=20, eos=(0,), lookahead=8):
    sync, asyn = fake.clients()
    return CadClient("m", alpha, list(eos), client=sync, async_client=asyn, candidates=candidates,
                     lookahead=lookahead)


def test_with_every_token_a_candidate_served_cad_equals_transformers_cad(fake, tiny_llama, conflicts):
    """Candidates = the whole vocabulary: the served loop is exactly transformers' CAD."""
    tok = tiny_llama.tokenizer
    client = _cad(fake, candidates=len(tok))
    fake.max_logprobs = len(tok)
    for e in conflicts[:4]:
        expected = greedy_generate(tiny_llama.model, tok, [e.prompt], 6, cad_alpha=0.5,
                                   prompts_without_context=[e.prompt_without_context])[0]
        result = CadResult()
        text = "".join(client.stream(e.prompt, e.prompt_without_context, 6, result=result))
        assert text == expected and len(result.token_ids) <= 6


def test_twenty_candidates_mostly_agree_and_the_loop_is_two_requests_a_token(fake, tiny_llama, conflicts):
    tok = tiny_llama.tokenizer
    client = _cad(fake, lookahead=1)
    same = 0
    for e in conflicts[:8]:
        expected = greedy_generate(tiny_llama.model, tok, [e.prompt], 5, cad_alpha=0.5,
                                   prompts_without_context=[e.prompt_without_context])[0]
        fake.requests.clear()
        result = CadResult()
        same += "".join(client.stream(e.prompt, e.prompt_without_context, 5, result=result)) == expected
        n = len(result.token_ids)
        # 2 tokenizations, 2 completions per step (steps = tokens, + 1 if it stopped on EOS), 1 detokenize per token
        steps = n + (result.finish_reason == "stop")
        assert fake.requests.count("/v1/completions") == 2 * steps == result.requests
        assert fake.requests.count("/tokenize") == 2
    assert same >= 6


@pytest.mark.parametrize("lookahead", [2, 3, 8])
def test_a_draft_verified_in_rounds_gives_the_same_tokens_in_fewer_requests(fake, conflicts, lookahead):
    """A round drafts ``lookahead`` greedy tokens with the context and checks them all in one
    request without it: the tokens are those of two requests per token, where CAD keeps greedy's
    token the rounds save requests, and each round chose at least one token."""
    saved = 0
    for e in conflicts[:6]:
        one, drafted = CadResult(), CadResult()
        text = "".join(_cad(fake, lookahead=1, alpha=1.0).stream(e.prompt, e.prompt_without_context, 9, result=one))
        fake.requests.clear()
        drafted_text = "".join(_cad(fake, lookahead=lookahead, alpha=1.0).stream(
            e.prompt, e.prompt_without_context, 9, result=drafted))
        assert (drafted_text, drafted.token_ids, drafted.finish_reason, drafted.changed) == (
            text, one.token_ids, one.finish_reason, one.changed)
        assert drafted.requests == fake.requests.count("/v1/completions") <= one.requests
        rounds = drafted.requests // 2
        assert rounds <= len(drafted.token_ids) + 1
        # one detokenization per round that chose tokens, not per token
        assert fake.requests.count("/detokenize") <= rounds + 1
        saved += one.requests - drafted.requests
    assert saved > 0


def test_responses_garbled_by_the_vllm_bug_are_cut_or_sent_again(fake, conflicts):
    """vLLM 0.32 answers a top-logprobs request that shares a step with a logprob_token_ids one
    with the sampled token only: the draft is cut where that starts (at 0 it is sent again), and
    the tokens stay those of a clean server; one that never recovers is a clear error."""
    e = conflicts[0]
    clean = CadResult()
    text = "".join(_cad(fake, alpha=1.0).stream(e.prompt, e.prompt_without_context, 9, result=clean))
    fake.garble = [3, 0, 0, 1]
    garbled = CadResult()
    assert "".join(_cad(fake, alpha=1.0).stream(e.prompt, e.prompt_without_context, 9, result=garbled)) == text
    assert garbled.token_ids == clean.token_ids and garbled.retries == 2 and garbled.requests > clean.requests
    # every logprob_token_ids list has one length, so vLLM never pads one (its padding overwrites token 0)
    assert {len(b["logprob_token_ids"]) for b in fake.bodies if "logprob_token_ids" in b} == {128}
    fake.garble = [0] * 100
    with pytest.raises(IrcanError, match="logprobs for fewer tokens than asked 51 times"):
        list(_cad(fake).stream(e.prompt, e.prompt_without_context, 3))


def test_the_two_request_kinds_never_overlap_on_one_server(fake, conflicts):
    """Threads and tasks streaming CAD at once: a top-logprobs request and a logprob_token_ids
    request are never in flight together (the vLLM bug), yet each kind runs many at a time."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    inside, seen, lock = {"token ids": 0, "top logprobs": 0}, [], threading.Lock()
    serve = fake.__call__

    def slow(request):
        body = json.loads(request.content) if request.url.path == "/v1/completions" else {}
        kind = "token ids" if "logprob_token_ids" in body else "top logprobs" if body else None
        if kind:
            with lock:
                inside[kind] += 1
                seen.append(dict(inside))
        time.sleep(0.01)
        try:
            return serve(request)
        finally:
            if kind:
                with lock:
                    inside[kind] -= 1

    fake.__call__ = slow
    client = _cad(fake)
    client.client._client._transport = httpx2.MockTransport(slow)
    client.async_client._client._transport = httpx2.MockTransport(slow)
    rows = conflicts[:6]
    with ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(lambda e: "".join(client.stream(e.prompt, e.prompt_without_context, 6)), rows))

    async def tasks():
        async def one(e):
            return "".join([d async for d in client.astream(e.prompt, e.prompt_without_context, 6)])
        return await asyncio.gather(*(one(e) for e in rows))

    assert asyncio.run(tasks()) == texts
    assert seen and all(not (s["token ids"] and s["top logprobs"]) for s in seen)
    assert max(s["top logprobs"] for s in seen) > 1 and max(s["token ids"] for s in seen) > 1


def test_a_task_cancelled_while_it_waits_leaves_the_gate_as_it_was():
    async def run():
        gate = _TaskGate()
        async with gate("token ids"):
            waiter = asyncio.create_task(gate("top logprobs").__aenter__())
            await asyncio.sleep(0.01)
            assert gate.waiting["top logprobs"] == 1 and not waiter.done()
            assert not gate.may_enter("token ids")  # the other kind waits: no more of this one
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert gate.waiting["top logprobs"] == 0 and gate.may_enter("token ids")
        assert gate.inside == 0

    asyncio.run(run())


def test_candidates_of_a_long_draft_are_split_under_the_servers_cap():
    orders = [list(range(i * 50, i * 50 + 50)) for i in range(5)]
    assert list(_groups(orders)) == [[0, 1], [2, 3], [4]]
    assert list(_groups([[1, 2]] * 70)) == [list(range(70))]  # the same candidates: one request


def test_async_stream_equals_sync(fake, conflicts):
    client = _cad(fake)
    e = conflicts[1]

    async def run():
        return "".join([d async for d in client.astream(e.prompt, e.prompt_without_context, 5)])

    assert asyncio.run(run()) == "".join(client.stream(e.prompt, e.prompt_without_context, 5))


def test_alpha_zero_is_greedy_decoding(fake, tiny_llama, conflicts):
    e = conflicts[2]
    greedy = greedy_generate(tiny_llama.model, tiny_llama.tokenizer, [e.prompt], 5)[0]
    assert "".join(_cad(fake, alpha=0.0).stream(e.prompt, e.prompt_without_context, 5)) == greedy


def test_choice_and_ties():
    with_context = {1: -0.1, 2: -1.0, 3: -2.0}
    without = {1: -0.05, 2: -5.0, 3: -2.0}
    assert cad_choice(with_context, without, 0.0, [1, 2, 3]) == 1
    assert cad_choice(with_context, without, 1.0, [1, 2, 3]) == 2  # 2*-1 + 5 = 3 beats 2*-0.1 + 0.05
    assert cad_choice({1: -1.0, 2: -1.0}, {1: -1.0, 2: -1.0}, 0.5, [2, 1]) == 2  # a tie goes to the better-ranked


def test_stop_sequences_cut_the_text_and_partial_characters_wait():
    text = _Text(["\n"])
    assert text.update("Par") == "Par"
    assert text.update("Paris\ufffd") == "is"
    assert text.update("Paris é\nmore") == " é" and text.stopped and text.text == "Paris é"


def test_stop_sequence_in_a_served_generation(fake, conflicts):
    e = conflicts[0]
    free = "".join(_cad(fake).stream(e.prompt, e.prompt_without_context, 8))
    assert len(free) > 2
    stop = free[2]
    result = CadResult()
    cut = "".join(_cad(fake).stream(e.prompt, e.prompt_without_context, 8, stop=[stop], result=result))
    assert cut == free[: free.index(stop)] and result.finish_reason == "stop"


def test_bad_input_and_refusals_say_what_to_do(fake, conflicts):
    e = conflicts[0]
    with pytest.raises(IrcanError, match="cad_alpha must be >= 0"):
        _cad(fake, alpha=-0.5)
    with pytest.raises(IrcanError, match="end-of-sequence token ids"):
        _cad(fake, eos=())
    with pytest.raises(IrcanError, match="cad_lookahead must be at least 1"):
        _cad(fake, lookahead=0)
    fake.max_logprobs, fake.max_token_ids = 600, 128  # vLLM scores at most 128 given tokens per request
    with pytest.raises(IrcanError, match="cad_candidates at most 128"):
        list(_cad(fake, candidates=200).stream(e.prompt, e.prompt_without_context, 3))
    fake.max_logprobs = 5
    with pytest.raises(IrcanError, match="--max-logprobs 20"):
        list(_cad(fake).stream(e.prompt, e.prompt_without_context, 3))
    with pytest.raises(IrcanError, match="returned no logprobs"):
        token_logprobs({"choices": [{"text": "x", "logprobs": None}]})
