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
from ircan_serve.serving.cad import CadClient, CadResult, _Text, cad_choice, token_logprobs


class FakeVLLM:
    """vLLM's CAD endpoints on a transformers model; counts requests, can cap logprobs."""

    def __init__(self, model, tokenizer, max_logprobs=20):
        self.model, self.tokenizer, self.max_logprobs = model, tokenizer, max_logprobs
        self.requests = []

    def _logprobs(self, ids):
        with torch.no_grad():
            return torch.log_softmax(self.model(torch.tensor([ids])).logits[0, -1].double(), -1)

    def __call__(self, request):
        body = json.loads(request.content)
        path = request.url.path
        self.requests.append(path)
        if path == "/tokenize":
            return httpx2.Response(200, json={"tokens": encode(self.tokenizer, body["prompt"])})
        if path == "/detokenize":
            return httpx2.Response(200, json={"prompt": self.tokenizer.decode(body["tokens"])})
        k = body["logprobs"]
        if k > self.max_logprobs:
            return httpx2.Response(400, json={"error": {"message": f"Requested sample logprobs of {k}, which is "
                                                        f"greater than max allowed: {self.max_logprobs}",
                                                        "type": "BadRequestError", "code": 400}})
        lp = self._logprobs(body["prompt"])
        ids = body.get("logprob_token_ids") or lp.topk(k).indices.tolist()
        top = {f"token_id:{i}": float(lp[i]) for i in ids}
        return httpx2.Response(200, json={"choices": [{"text": "", "logprobs": {"top_logprobs": [top]}}]})

    def clients(self):
        common = {"base_url": "http://vllm.test/v1", "api_key": "k", "max_retries": 0}
        return (openai.OpenAI(**common, http_client=httpx2.Client(transport=httpx2.MockTransport(self))),
                openai.AsyncOpenAI(**common, http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(self))))


@pytest.fixture
def fake(tiny_llama):
    return FakeVLLM(tiny_llama.model, tiny_llama.tokenizer)


def _cad(fake, alpha=0.5, candidates=20, eos=(0,)):
    sync, asyn = fake.clients()
    return CadClient("m", alpha, list(eos), client=sync, async_client=asyn, candidates=candidates)


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
    client = _cad(fake)
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
        assert fake.requests.count("/v1/completions") == 2 * steps and fake.requests.count("/tokenize") == 2
    assert same >= 6


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
    fake.max_logprobs = 5
    with pytest.raises(IrcanError, match="--max-logprobs 20"):
        list(_cad(fake).stream(e.prompt, e.prompt_without_context, 3))
    with pytest.raises(IrcanError, match="returned no logprobs"):
        token_logprobs({"choices": [{"text": "x", "logprobs": None}]})
