"""Attribution on the real embedded SmolLM2: fast = reference (float64, float32), bfloat16."""

import pytest
import torch

from ircan_serve.attribution import ContextAwareIntegratedGradients
from ircan_serve.config import AttributionConfig

pytestmark = pytest.mark.e2e


def test_smollm2_is_the_embedded_llama(smollm2):
    assert smollm2.model.config.model_type == "llama"
    assert smollm2.model.config.num_hidden_layers == 30
    assert smollm2.model.config.intermediate_size == 1536


def test_fast_matches_reference_on_smollm2(smollm2, conflicts):
    """In float64 the two algorithms agree far below 1e-5 relative."""
    model = smollm2.model.double()
    try:
        ig = ContextAwareIntegratedGradients(model, smollm2.tokenizer)
        config = dict(layers=[0, 14, 22, 29])
        # a pass per layer: layers below each are replayed, not run
        fast = ig.attribute(conflicts[12], AttributionConfig(method="fast", internal_batch_size=20, **config))
        ref = ig.attribute(conflicts[12], AttributionConfig(method="reference", **config))
    finally:
        smollm2.model.float()
    scale = ref.scores.abs().max().item()
    assert scale > 0 and fast.answer_token == ref.answer_token
    torch.testing.assert_close(fast.scores, ref.scores, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("index", [12, 0])
def test_fast_matches_reference_in_float32_on_smollm2(smollm2, conflicts, index):
    """In float32 too, within 1e-5 of the largest score: both read P(answer) from 2-D hidden
    states with the accurate exp (the head called on the model's (m, 1, H) slice moved the
    reference by up to 2e-4 of the largest score; torch.softmax's faster exp moves P near 1 by
    1e-5)."""
    ig = ContextAwareIntegratedGradients(smollm2.model, smollm2.tokenizer)
    config = dict(layers=[0, 14, 22, 29])
    fast = ig.attribute(conflicts[index], AttributionConfig(method="fast", **config))
    ref = ig.attribute(conflicts[index], AttributionConfig(method="reference", **config))
    scale = ref.scores.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(fast.scores, ref.scores, rtol=1e-5, atol=1e-5 * scale)


def test_bfloat16_scores_match_float32_on_smollm2(conflicts):
    """A bfloat16 model: points, probabilities and scores stay float32, and the top neurons are
    those of the float32 model."""
    from ircan_serve.models import load_model

    ex = conflicts[12]
    config = AttributionConfig()
    out = {}
    for dtype in ("float32", "bfloat16"):
        lm = load_model("smollm2", dtype=dtype)
        assert next(lm.model.parameters()).dtype == getattr(torch, dtype)
        out[dtype] = ContextAwareIntegratedGradients(lm.model, lm.tokenizer).attribute(ex, config)
    f32, bf16 = out["float32"].scores, out["bfloat16"].scores
    assert bf16.dtype == torch.float32 and out["bfloat16"].activations_with.dtype == torch.float32
    top = lambda s, k: set(s.flatten().topk(k).indices.tolist())  # noqa: E731
    assert len(top(f32, 20) & top(bf16, 20)) >= 16  # 80% of the top 20 agree
    assert top(f32, 1) == top(bf16, 1)
    # the bound: bfloat16's 8-bit mantissa, carried through 30 layers, stays within 10% of the top score
    assert (f32 - bf16).abs().max() <= 0.1 * f32.abs().max()
