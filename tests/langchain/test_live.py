"""LangChain wrappers against the live vLLM server: the standard integration suite for the chat
model, the string LLM contract, and the RAG chain."""

import traceback
from contextlib import contextmanager

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests

from helpers import API_KEY
from ircan_serve.langchain import ChatIrcan, IrcanConnectionError, IrcanLLM


class ModelLimit(Exception):
    """A standard test failed exactly where the 135M model is known to fall short."""


@contextmanager
def known_limit(where: str):
    """Turn an AssertionError into :class:`ModelLimit` only when it failed at ``where`` (the
    failing source line, or text in the message); any other failure stays a failure."""
    try:
        yield
    except AssertionError as e:
        line = traceback.extract_tb(e.__traceback__)[-1].line or ""
        if where in line or where in str(e):
            raise ModelLimit(f"{where}: {e}") from e
        raise


class TestChatIrcanLive(ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def _server(self, vllm_server):
        type(self)._url = vllm_server.base_url
        type(self)._name = vllm_server.model_name

    @property
    def chat_model_class(self):
        return ChatIrcan

    @property
    def chat_model_params(self):
        return {"model": self._name, "base_url": self._url, "api_key": API_KEY,
                "max_tokens": 24, "temperature": 0}

    # Tool calling (tool_choice "any" -> "required") and structured output (json_schema) run
    # through vLLM's guided decoding, which SmolLM2 needs: it has no native tool-call format.
    @property
    def structured_output_kwargs(self):
        return {"method": "json_schema"}

    @property
    def supports_json_mode(self):
        return True

    # What a 135M model cannot do, even with guided decoding; the wrapper sends and parses the
    # requests (the other tool and structured-output tests pass). Greedy decoding makes these stable.
    @pytest.mark.xfail(strict=True, raises=__import__("openai").LengthFinishReasonError,
                       reason="SmolLM2-135M fills the JSON object's strings until the token limit")
    def test_json_mode(self, model):
        super().test_json_mode(model)

    @pytest.mark.xfail(strict=True, raises=__import__("openai").LengthFinishReasonError,
                       reason="SmolLM2-135M fills the JSON object's strings until the token limit")
    def test_structured_output_optional_param(self, model):
        super().test_structured_output_optional_param(model)

    @pytest.mark.xfail(strict=True, raises=ModelLimit,
                       reason="SmolLM2-135M does not call the tool itself in the agent loop (tool_choice auto)")
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model):
        with known_limit('assert any(block["type"] == "tool_call" for block in content_blocks)'):
            super().test_agent_loop(model)

    @pytest.mark.xfail(strict=True, raises=ModelLimit,
                       reason="SmolLM2-135M does not copy the Chinese text into the tool's argument")
    def test_unicode_tool_call_integration(self, model, tool_choice=None, force_tool_call=True):
        with known_limit("Unicode characters not found"):
            super().test_unicode_tool_call_integration(model)

    @pytest.fixture
    def model(self, request):  # built after _server has set the URL
        params = {**self.standard_chat_model_params, **self.chat_model_params,
                  **(getattr(request, "param", None) or {})}
        if any(k in request.node.name for k in ("tool", "structured", "json", "agent")):
            params["max_tokens"] = 160  # room for a whole JSON object; 24 tokens keep the rest fast
        return self.chat_model_class(**params)


@pytest.fixture
def llm(vllm_server, patched_smollm2):
    return IrcanLLM.from_checkpoint(patched_smollm2, base_url=vllm_server.base_url, api_key=API_KEY,
                                    max_tokens=12)


INDIA = ("Which country is the most populous in the world?",
         "As of 2023, India is the most populous country in the world.")


def test_llm_invoke_batch_stream(llm):
    prompt = "Context: The capital of France is Lyon.\nQuestion: What is the capital of France?\nAnswer:"
    text = llm.invoke(prompt)
    raw = llm.client.create(model=llm.model_name, prompt=prompt, max_tokens=12, temperature=0)
    assert text == raw.choices[0].text and text.strip()
    assert llm.batch([prompt, prompt]) == [text, text]  # greedy: deterministic
    assert "".join(llm.stream(prompt)) == text


async def test_llm_async(llm):
    prompt = "Question: What is the capital of France?\nAnswer:"
    text = await llm.ainvoke(prompt)
    assert "".join([c async for c in llm.astream(prompt)]) == text
    assert await llm.abatch([prompt]) == [text]


def test_llm_stop_and_max_tokens(llm):
    prompt = "Count: 1, 2, 3,"
    assert "\n" not in llm.invoke(prompt, stop=["\n"], max_tokens=40)
    short = llm.invoke(prompt, max_tokens=2)
    assert len(llm.client.create(model=llm.model_name, prompt=prompt, max_tokens=2)
               .choices[0].text) == len(short)


def test_llm_temperature_samples(llm):
    outs = {llm.invoke("Write a word:", temperature=1.5, max_tokens=8) for _ in range(4)}
    assert len(outs) > 1


def test_llm_context_slot_matches_hand_built_prompt(llm):
    question, context = INDIA
    assert llm.invoke(question, context=context) == llm.invoke(
        llm.prompt_template.render(question=question, context=context))


def test_llm_timeout_is_reported(vllm_server):
    slow = IrcanLLM(model=vllm_server.model_name, base_url=vllm_server.base_url, api_key=API_KEY,
                    timeout=0.001, max_retries=0, max_tokens=200)
    with pytest.raises(IrcanConnectionError, match="did not answer in time"):
        slow.invoke("Tell me a long story.")


def test_chat_context_slot(vllm_server, patched_smollm2):
    chat = ChatIrcan.from_checkpoint(patched_smollm2, base_url=vllm_server.base_url, api_key=API_KEY,
                                     max_tokens=16)
    question, context = INDIA
    msg = chat.invoke(question, context=context)
    assert msg.content and msg.usage_metadata["input_tokens"] > 20


def test_rag_chain_retrieves_and_answers(llm, conflicts):
    from ircan_serve.langchain.rag import build_retriever, conflict_documents, make_rag_chain

    retriever = build_retriever(conflict_documents(conflicts))
    for example in conflicts[:6]:
        assert retriever.invoke(example.question)[0].metadata["id"] == example.id
    chain = make_rag_chain(retriever, llm)
    out = chain.invoke(INDIA[0])
    assert out["context"] == INDIA[1] and out["question"] == INDIA[0] and out["answer"]
    # the top k: every retrieved document's text in the context, their ids to check the own one is there
    top4 = make_rag_chain(build_retriever(conflict_documents(conflicts), k=4), llm).invoke(INDIA[0])
    assert len(top4["documents"]) == 4 and top4["context"] == " ".join(d.page_content for d in top4["documents"])
    assert INDIA[1] in top4["context"] and top4["answer"]
