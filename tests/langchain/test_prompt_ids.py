"""The token ids the served wrappers send are the ids attribution scores (text and chat mode).

The wrapper's HTTP request is captured as it leaves the client, replayed to the live vLLM server
with ``return_token_ids``, and the prompt ids vLLM reports are compared with
``encode(tokenizer, example.prompt)``, the ids :class:`ContextAwareIntegratedGradients` runs on.
"""

import json

import httpx

from helpers import API_KEY
from ircan_serve.checkpoint.manifest import Manifest
from ircan_serve.data import load_examples
from ircan_serve.langchain import ChatIrcan, IrcanLLM
from ircan_serve.prompts import PromptTemplate, encode


def _sent_request(wrapper, call) -> tuple[str, dict]:
    """(path, JSON body) of the request ``call()`` makes through ``wrapper``'s client."""
    seen = []
    root = getattr(wrapper, "root_client", None) or wrapper.client._client  # ChatOpenAI / OpenAI
    root._client.event_hooks["request"].append(lambda r: seen.append(r))
    call()
    request = seen[-1]
    return request.url.path, json.loads(request.content)


def _served_prompt_ids(server, path: str, body: dict) -> list[int]:
    body = {**body, "return_token_ids": True, "max_tokens": 1, "stream": False}
    body.pop("stream_options", None)
    r = httpx.post(f"{server.base_url.removesuffix('/v1')}{path}", json=body,
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    r.raise_for_status()
    data = r.json()
    return data.get("prompt_token_ids") or data["choices"][0]["prompt_token_ids"]


def test_served_ids_equal_attributed_ids(vllm_server, patched_smollm2, smollm2):
    manifest = Manifest.load(patched_smollm2)
    chat_mode = manifest.prompt_template.model_copy(update={"chat": True, "system": "Answer briefly."})
    for template in (manifest.prompt_template, chat_mode):
        examples = load_examples("conflicts", template=template, tokenizer=smollm2.tokenizer, limit=3).examples
        cls = ChatIrcan if template.chat else IrcanLLM
        wrapper = cls(model=vllm_server.model_name, base_url=vllm_server.base_url, api_key=API_KEY,
                      max_tokens=2, prompt_template=template)
        for e in examples:
            path, body = _sent_request(wrapper, lambda w=wrapper, e=e: w.invoke(e.question, context=e.context))
            assert path.endswith("/chat/completions" if template.chat else "/completions")
            attributed = encode(smollm2.tokenizer, e.prompt)
            assert _served_prompt_ids(vllm_server, path, body) == attributed, (template.chat, e.id)
    # the chat prompt really is the chat template, with the system message first
    assert examples[0].prompt.startswith("<|im_start|>system\nAnswer briefly.")


def test_chat_mode_prompt_renders_the_chat_template(smollm2):
    t = PromptTemplate(with_context="Context: {context}\nQuestion: {question}", without_context="Question: {question}",
                       chat=True)
    text = t.model_input(smollm2.tokenizer, "Who?", "Bob did.")
    assert "<|im_start|>user\nContext: Bob did.\nQuestion: Who?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n") and t.continuation(" Bob") == "Bob"
