"""The fast path's machinery: pass sizes, replayed layers, rows per layer, the prefix cache, copies."""

import pytest
import torch

from helpers import four_layer_llama, token_ids
from ircan_serve.attribution import ContextAwareIntegratedGradients
from ircan_serve.config import AttributionConfig


def test_default_pass_size_fits_the_memory_budget(tiny_llama, conflicts, monkeypatch):
    """Short prompts run every layer's rows in one pass; a budget that holds fewer rows splits
    the layers over more passes, with the same scores."""
    from ircan_serve.attribution import fast
    from ircan_serve.attribution.shared_prefix_attention import shares_prefix

    model, tok = tiny_llama.model, tiny_llama.tokenizer
    ig = ContextAwareIntegratedGradients(model, tok)
    passes = []  # the decoder's runs, True for those from a prefix cache (the fast passes)
    decoder = model.base_model
    real_forward = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda *a, **k: (passes.append(k.get("past_key_values") is not None),
                                                             real_forward(*a, **k))[1])
    config = AttributionConfig(n_steps=4)
    one = ig.attribute(conflicts[0], config).scores
    assert passes.count(True) == 1  # all layers x 4 steps in one pass

    prefix = model.base_model(torch.tensor([tok(conflicts[0].prompt)["input_ids"][:-1]]), use_cache=True).past_key_values
    assert shares_prefix(model, prefix)
    per_row = fast.PASS_MEMORY_BYTES // fast.rows_per_pass(model, prefix, shared=True)
    monkeypatch.setattr(fast, "PASS_MEMORY_BYTES", per_row * 5)  # 5 rows: one layer of 4 steps
    passes.clear()
    split = ig.attribute(conflicts[0], config).scores
    assert passes.count(True) == model.config.num_hidden_layers
    torch.testing.assert_close(split, one, rtol=1e-5, atol=1e-6 * one.abs().max().item())


@pytest.mark.parametrize("model_type", ["mistral", "gemma2", "gemma3_text"])
def test_fast_path_on_sliding_window_caches(tiny_tokenizer, conflicts, model_type):
    """Prompts longer than the sliding window: the fast path's prefix cache must still work
    (cropping a full-prompt sliding-window cache raises) and equal the reference."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, vocab_size=len(tiny_tokenizer), hidden_size=128, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, intermediate_size=256,
                               max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                               sliding_window=8, head_dim=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ex = conflicts[3]
    assert len(tiny_tokenizer(ex.prompt)["input_ids"]) > 8
    ig = ContextAwareIntegratedGradients(model, tiny_tokenizer)
    fast = ig.attribute(ex, AttributionConfig(n_steps=3)).scores
    ref = ig.attribute(ex, AttributionConfig(n_steps=3, method="reference")).scores
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("internal_batch_size", [5, 10, 15, 100])
def test_fast_path_starting_at_the_patched_layer_equals_reference(tiny_tokenizer, conflicts, internal_batch_size):
    """Layers below each pass's lowest patched layer are replayed from the plain pass, whatever
    the chunking (1, 2, 3 or all 4 layers per pass); the scores stay the reference's."""
    model = four_layer_llama(tiny_tokenizer)
    ig = ContextAwareIntegratedGradients(model, tiny_tokenizer)
    ex = conflicts[2]
    fast = ig.attribute(ex, AttributionConfig(n_steps=5, internal_batch_size=internal_batch_size)).scores
    ref = ig.attribute(ex, AttributionConfig(n_steps=5, method="reference")).scores
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_layers_below_the_patch_are_not_run(tiny_tokenizer, conflicts):
    """Scoring layers 2 and 3 runs layers 0-1 only in the two plain passes (without context,
    with context, whose cache cut by one token is the prefix), never in the integrated-gradient
    passes; afterwards every layer computes normally again."""
    model = four_layer_llama(tiny_tokenizer)
    calls = [0] * 4
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
    ig = ContextAwareIntegratedGradients(model, tiny_tokenizer)
    ig.attribute(conflicts[0], AttributionConfig(n_steps=4, internal_batch_size=4, layers=[2, 3]))
    assert calls[:2] == [2, 2]  # the plain passes only
    assert calls[2:] == [3, 4]  # + its own pass; layer 3 runs in both passes
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    calls[:] = [0] * 4
    model(torch.tensor([[1, 2, 3]]))
    assert calls == [1, 1, 1, 1]


def test_prefix_cache_is_left_unchanged(tiny_tokenizer, conflicts):
    """The integrated-gradient passes read the prefix cache through expanded views."""
    from ircan_serve.attribution.prefix_cache import per_row_cache

    model = four_layer_llama(tiny_tokenizer)
    ids = token_ids(tiny_tokenizer, conflicts[0].prompt)
    prefix = model(ids[:, :-1], use_cache=True).past_key_values
    before = [layer.keys.clone() for layer in prefix.layers]
    assert [layer.keys.shape[0] for layer in per_row_cache(prefix, [0, 0, 6, 6]).layers] == [1, 1, 6, 6]
    view = per_row_cache(prefix, 6)
    model(ids[:, -1:].expand(6, 1), past_key_values=view, use_cache=True)
    assert view.get_seq_length() == ids.shape[1]
    assert all(torch.equal(b, layer.keys) for b, layer in zip(before, prefix.layers))
    assert prefix.get_seq_length() == ids.shape[1] - 1


def test_each_layer_computes_only_the_rows_that_patch_it_or_a_lower_layer(tiny_tokenizer, conflicts):
    """One pass for layers 0 and 2 of 4 (m = 3: row 0, unpatched, is alpha = 1 for both layers,
    then 2 rows per layer). A patching row needs only the output projection of its own layer, so
    layer 0 computes row 0, layers 1 and 2 also the 2 rows that patch layer 0, layer 3 all 5; the
    other rows carry the recorded hidden states (plus the projection's change at their layer)."""
    model = four_layer_llama(tiny_tokenizer)
    seen: list[list[int]] = [[] for _ in range(4)]
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda _m, args, i=i: seen[i].append(args[0].shape[0]))
    ig = ContextAwareIntegratedGradients(model, tiny_tokenizer)
    ex = conflicts[1]
    fast = ig.attribute(ex, AttributionConfig(n_steps=3, internal_batch_size=6, layers=[0, 2])).scores
    assert [rows[-1] for rows in seen] == [1, 3, 3, 5]
    ref = ig.attribute(ex, AttributionConfig(n_steps=3, method="reference", layers=[0, 2])).scores
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_caches_that_cannot_be_viewed_are_copied_and_still_equal_the_reference(tiny_tokenizer, conflicts,
                                                                             monkeypatch):
    """A cache without per-layer key/value tensors is deep-copied with every row; the layers
    that run then compute every row (a copy cannot hold fewer rows in some layers)."""
    from ircan_serve.attribution import fast, prefix_cache, shared_prefix_attention

    model = four_layer_llama(tiny_tokenizer)
    for module in (fast, prefix_cache, shared_prefix_attention):
        monkeypatch.setattr(module, "has_tensor_layers", lambda _prefix: False)
    ig = ContextAwareIntegratedGradients(model, tiny_tokenizer)
    ex = conflicts[2]
    fast = ig.attribute(ex, AttributionConfig(n_steps=3, internal_batch_size=6, layers=[1, 2])).scores
    ref = ig.attribute(ex, AttributionConfig(n_steps=3, method="reference", layers=[1, 2])).scores
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
