"""Gemma 3 270M end to end: attribution of real rows, selection, export, verify, then served by vLLM
on CPU (the KV cache sized for the model) with greedy tokens equal to transformers."""

import pytest
import torch

from helpers import teacher_forced_logprobs
from ircan_serve.attribution import attribute_examples
from ircan_serve.checkpoint.export import export_checkpoint
from ircan_serve.checkpoint.verify import verify_checkpoint
from ircan_serve.config import AttributionConfig, SelectionConfig
from ircan_serve.data import load_examples
from ircan_serve.reweight import reweighted
from ircan_serve.selection import select_units
from ircan_serve.serving import ServeConfig, VLLMServer

PROMPTS = ["Context: The capital of France is Lyon.\nQuestion: What is the capital of France?\nAnswer:",
           "Question: What is the capital of Japan?\nAnswer:", "To be or not to be, that is the"]


@pytest.fixture(scope="module")
def patched_gemma3(gemma3, tmp_path_factory):
    rows = load_examples("conflicts", limit=3, tokenizer=gemma3.tokenizer).examples
    records = attribute_examples(gemma3.model, gemma3.tokenizer, rows,
                                 AttributionConfig(quadrature="gauss-legendre", n_steps=4), progress=False)
    units = select_units(records, SelectionConfig(num_neurons=2)).scaled(5.0, "signed")
    out = tmp_path_factory.mktemp("gemma") / "gemma3-conflicts"
    export_checkpoint(gemma3.source, units, None, out, base_model="gemma3-270m")
    return out, units


@pytest.mark.server  # starts its own vLLM
def test_gemma3_patch_is_verified_and_served_like_transformers(gemma3, patched_gemma3):
    out, units = patched_gemma3
    report = verify_checkpoint(out, base="gemma3-270m")
    assert report.ok, report.problems
    assert "license: gemma" in (out / "README.md").read_text()
    tok, model = gemma3.tokenizer, gemma3.model
    shifts = []
    with VLLMServer(out, ServeConfig()) as server:
        assert "--kv-cache-memory-bytes" in server.command  # sized for the model, not a fixed share
        client = server.client()
        for prompt in PROMPTS:
            choice = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=6, temperature=0,
                                               logprobs=1, extra_body={"return_tokens_as_token_ids": True}).choices[0]
            ids = tok(prompt, return_tensors="pt").input_ids
            with torch.no_grad(), reweighted(model, units):
                new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                     pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
            served = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
            assert served == new[: len(served)] and len(served) >= 1, prompt
            logprobs = torch.tensor(choice.logprobs.token_logprobs)
            shifts.append((logprobs - teacher_forced_logprobs(model, ids, served)).abs().max().item())
    assert max(shifts) > 1e-2  # the served numbers are the patched model's, not the base's
