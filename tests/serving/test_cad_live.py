"""CAD served by the live vLLM server, through the LangChain wrappers, against transformers' CAD."""

import asyncio

import pytest

from helpers import API_KEY
from ircan_serve.errors import IrcanError
from ircan_serve.generation import greedy_generate
from ircan_serve.langchain import ChatIrcan, IrcanLLM

PROMPTS = 24


@pytest.fixture(scope="module")
def served_and_local(vllm_server, patched_smollm2, conflicts):
    """Served CAD (IrcanLLM, alpha 0.5, 10 tokens) and transformers' CAD on the same checkpoint,
    for the first 24 shipped conflicts."""
    from ircan_serve.models import load_model

    llm = IrcanLLM.from_checkpoint(patched_smollm2, base_url=vllm_server.base_url, api_key=API_KEY,
                                   max_tokens=10, cad_alpha=0.5)
    rows = conflicts[:PROMPTS]
    served = [llm.invoke(e.question, context=e.context) for e in rows]
    local = load_model(str(patched_smollm2))
    expected = greedy_generate(local.model, local.tokenizer, [e.prompt for e in rows], 10, cad_alpha=0.5,
                               prompts_without_context=[e.prompt_without_context for e in rows])
    plain = greedy_generate(local.model, local.tokenizer, [e.prompt for e in rows], 10)
    return llm, rows, served, expected, plain


def test_served_cad_equals_transformers_cad(served_and_local):
    """The candidate set (the 20 tokens most likely with the context) is where the served CAD
    can differ from transformers' (whole vocabulary); on these prompts it differs on at most 2 of
    24, and CAD changes the answer somewhere (it is not plain decoding)."""
    _llm, _rows, served, expected, plain = served_and_local
    differ = [i for i, (s, e) in enumerate(zip(served, expected)) if s != e]
    assert len(differ) <= 2, [(served[i], expected[i]) for i in differ]
    assert any(e != p for e, p in zip(expected, plain))


def test_concurrent_cad_equals_one_at_a_time(served_and_local):
    """Eight questions in flight give the tokens of one at a time. vLLM 0.32 returns only the
    sampled token's logprob to a top-logprobs request that shares a step with a logprob_token_ids
    one; without CAD's gate this fell back to greedy decoding on most of these prompts."""
    from ircan_serve.langchain.rag import ask_with_contexts

    llm, rows, served, _expected, _plain = served_and_local
    assert ask_with_contexts(llm, [(e.question, e.context) for e in rows], concurrency=8) == served


def test_cad_works_through_every_langchain_path(served_and_local, vllm_server, patched_smollm2):
    llm, rows, served, _expected, _plain = served_and_local
    e = rows[0]
    assert "".join(llm.stream(e.question, context=e.context)) == served[0]
    assert asyncio.run(llm.ainvoke(e.question, context=e.context)) == served[0]
    assert llm.batch([e.question], context=e.context) == [served[0]]
    short = IrcanLLM.from_checkpoint(patched_smollm2, base_url=vllm_server.base_url, api_key=API_KEY,
                                     max_tokens=2, cad_alpha=0.5)
    result = short.generate([e.question], context=e.context)
    assert result.generations[0][0].generation_info["finish_reason"] in ("length", "stop")
    assert served[0].startswith(result.generations[0][0].text)
    stop = served[0].strip()[:1]
    cut = llm.invoke(e.question, context=e.context, stop=[stop])
    assert stop not in cut and served[0].startswith(cut)


def test_chat_cad_streams_what_it_returns(vllm_server, patched_smollm2, conflicts):
    from ircan_serve.checkpoint.manifest import Manifest

    template = Manifest.load(patched_smollm2).prompt_template.model_copy(update={"chat": True})
    chat = ChatIrcan.from_checkpoint(patched_smollm2, base_url=vllm_server.base_url, api_key=API_KEY,
                                     max_tokens=8, cad_alpha=1.0, prompt_template=template)
    e = conflicts[3]
    whole = chat.invoke(e.question, context=e.context)
    assert whole.content and whole.response_metadata["cad_alpha"] == 1.0
    assert "".join(c.content for c in chat.stream(e.question, context=e.context)) == whole.content

    async def streamed():
        return "".join([c.content async for c in chat.astream(e.question, context=e.context)])

    assert asyncio.run(streamed()) == whole.content


def test_a_server_cap_below_the_candidates_is_a_clear_error(vllm_server, patched_smollm2, conflicts):
    llm = IrcanLLM.from_checkpoint(patched_smollm2, base_url=vllm_server.base_url, api_key=API_KEY,
                                   max_tokens=2, cad_alpha=0.5, cad_candidates=30)
    with pytest.raises(IrcanError, match="--max-logprobs 30"):
        llm.invoke(conflicts[0].question, context=conflicts[0].context)
