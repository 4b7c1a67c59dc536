"""LangChain wrappers against the live vLLM server: the standard integration suite for the chat
model, the string LLM contract, and the RAG chain."""

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests

from conftest import API_KEY
from ircan_serve.langchain import ChatIrcan, IrcanConnectionError, IrcanLLM

pytestmark = pytest.mark.server


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

    @property
    def has_tool_calling(self):
        return False

    @property
    def has_structured_output(self):
        return False

    @pytest.fixture
    def model(self, request):  # built after _server has set the URL
        return self.chat_model_class(**self.chat_model_params)


@pytest.fixture
def llm(vllm_server, patched_smollm2):
    return IrcanLLM.from_checkpoint(patched_smollm2, base_url=vllm_server.base_url, api_key=API_KEY,
                                    max_tokens=12)


INDIA = ("Which country is the most populous in the world?",
         "As of 2023, India is the most populous country in the world.")


def test_llm_invoke_batch_stream(llm):
    prompt = "Context: The capital of France is Lyon.\nQuestion: What is the capital of France?\nAnswer:"
    text = llm.invoke(prompt)
    raw = llm._client.completions.create(model=llm.model, prompt=prompt, max_tokens=12, temperature=0)
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
    assert len(llm._client.completions.create(model=llm.model, prompt=prompt, max_tokens=2)
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
