"""LangChain wrappers without a server: the standard unit suite and the wrapper contracts."""

import pytest
from langchain_tests.unit_tests import ChatModelUnitTests

from ircan_serve.data import QA_TEMPLATE
from ircan_serve.errors import IrcanError
from ircan_serve.langchain import ChatIrcan, IrcanConnectionError, IrcanLLM

DEAD_URL = "http://127.0.0.1:9/v1"  # nothing listens on the discard port


class TestChatIrcanUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self):
        return ChatIrcan

    @property
    def chat_model_params(self):
        return {"model": "smollm2-conflicts", "base_url": DEAD_URL, "temperature": 0}

    @property
    def init_from_env_params(self):
        return ({"IRCAN_BASE_URL": "http://127.0.0.1:8123/v1", "IRCAN_API_KEY": "secret"},
                {"model": "m"}, {"base_url": "http://127.0.0.1:8123/v1", "api_key": "secret"})


def test_identifying_and_tracing_params():
    llm = IrcanLLM(model="m", base_url=DEAD_URL, temperature=0.3, max_tokens=7, stop=["\n"])
    assert llm._identifying_params == {"model": "m", "base_url": DEAD_URL, "temperature": 0.3,
                                       "max_tokens": 7, "stop": ["\n"]}
    ls = llm._get_ls_params(stop=["."])
    assert ls == {"ls_provider": "ircan", "ls_model_name": "m", "ls_model_type": "llm",
                  "ls_temperature": 0.3, "ls_max_tokens": 7, "ls_stop": ["\n", "."]}
    assert ChatIrcan(model="m")._get_ls_params()["ls_model_type"] == "chat"
    assert llm._llm_type == "ircan-vllm"


def test_request_params_merge_fields_and_call_overrides():
    llm = IrcanLLM(model="m", stop=["\n"], extra_body={"top_k": 3}, max_retries=5, timeout=3.5)
    params = llm._request_params(["END"], {"max_tokens": 4, "temperature": 0.5, "context": "x"})
    assert params == {"model": "m", "temperature": 0.5, "max_tokens": 4, "stop": ["\n", "END"],
                      "extra_body": {"top_k": 3}}
    assert llm._client.max_retries == 5 and llm._client.timeout == 3.5


def test_context_slot_uses_the_template():
    llm = IrcanLLM(model="m", prompt_template=QA_TEMPLATE)
    assert llm._with_context("Capital?", "Lyon is the capital.") == \
        "Context: Lyon is the capital.\nQuestion: Capital?\nAnswer:"
    assert llm._with_context("Capital?", None) == "Capital?"
    with pytest.raises(IrcanError, match="no prompt_template"):
        IrcanLLM(model="m")._with_context("q", "c")


def test_unreachable_server_is_a_clear_error():
    llm = IrcanLLM(model="m", base_url=DEAD_URL, max_retries=0)
    with pytest.raises(IrcanConnectionError, match="could not reach the model server at .*ircan serve"):
        llm.invoke("hi")
    chat = ChatIrcan(model="m", base_url=DEAD_URL, max_retries=0)
    with pytest.raises(IrcanConnectionError):
        list(chat.stream("hi"))


def test_errors_stay_openai_types_so_langchain_retry_matches():
    """with_retry(retry_if_exception_type=(openai.APIConnectionError,)) retries our error."""
    import openai

    calls = []

    def counting(_: object) -> None:
        calls.append(1)

    chat = ChatIrcan(model="m", base_url=DEAD_URL, max_retries=0)
    chain = chat.with_listeners(on_start=counting).with_retry(
        retry_if_exception_type=(openai.APIConnectionError,), stop_after_attempt=3, wait_exponential_jitter=False)
    with pytest.raises(openai.APIConnectionError, match="is `ircan serve` running") as info:
        chain.invoke("hi")
    assert isinstance(info.value, IrcanError) and len(calls) == 3


async def test_unreachable_server_async():
    with pytest.raises(IrcanConnectionError):
        await ChatIrcan(model="m", base_url=DEAD_URL, max_retries=0).ainvoke("hi")


def test_tool_messages_are_refused():
    from langchain_core.messages import ToolMessage

    from ircan_serve.langchain.chat import to_openai_messages

    with pytest.raises(IrcanError, match="ToolMessage is not supported"):
        to_openai_messages([ToolMessage(content="x", tool_call_id="1")])
