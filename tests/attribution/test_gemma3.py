"""Gemma 3 270M, the second real model: the family where the fast path's special cases live
(post-FFN norm, sliding-window layers, QK norm, a 262k-token vocabulary, tied embeddings)."""

import pytest
import torch

from helpers import FIXTURES
from ircan_serve.attribution import ContextAwareIntegratedGradients
from ircan_serve.config import AttributionConfig
from ircan_serve.data import load_examples

LAYERS = [0, 5, 11, 17]
"""Sliding-window layers (0, 11) and global ones (5, 17)."""


@pytest.mark.parametrize("source", ["memotrap", "conflicts"])
def test_fast_equals_reference_on_gemma3(gemma3, source):
    """In float32, within 1e-5 of the largest score, on a MemoTrap row and a shipped conflict."""
    path = FIXTURES / "data" / "memotrap-dev-head.jsonl" if source == "memotrap" else "conflicts"
    example = load_examples(path, limit=13, tokenizer=gemma3.tokenizer).examples[-1]
    assert gemma3.model.config.model_type == "gemma3_text"
    ig = ContextAwareIntegratedGradients(gemma3.model, gemma3.tokenizer)
    fast = ig.attribute(example, AttributionConfig(layers=LAYERS, n_steps=8)).scores
    ref = ig.attribute(example, AttributionConfig(layers=LAYERS, n_steps=8, method="reference")).scores
    scale = ref.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5 * scale)
