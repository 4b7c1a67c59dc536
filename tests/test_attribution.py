import pytest
import torch

from ircan_serve.attribution import (
    AnswerProbability,
    AnswerProbabilityHead,
    AttributionStore,
    ContextAwareIntegratedGradients,
    answer_token_id,
    attribute_examples,
    riemann_alphas,
)
from ircan_serve.config import AttributionConfig
from ircan_serve.errors import IrcanError


def test_answer_token_keeps_leading_space(tiny_llama):
    tok = tiny_llama.tokenizer
    prompt = "Question: What is the capital of France?\nAnswer:"
    token = answer_token_id(tok, prompt, " Lyon")
    assert tok.convert_ids_to_tokens(token).startswith("Ġ")
    assert token != tok("Lyon", add_special_tokens=False)["input_ids"][0]


def test_riemann_points_are_the_papers():
    assert riemann_alphas(4).tolist() == [0.25, 0.5, 0.75, 1.0]


def test_answer_probability_equals_softmax_and_its_gradient():
    torch.manual_seed(0)
    logits = (torch.randn(5, 300, dtype=torch.float64) * 6).requires_grad_()
    assert torch.autograd.gradcheck(AnswerProbability.apply, (logits, 7))
    weights = torch.rand(5, dtype=torch.float64)
    (ours,) = torch.autograd.grad((AnswerProbability.apply(logits, 7) * weights).sum(), logits)
    (plain,) = torch.autograd.grad((torch.softmax(logits, -1)[:, 7] * weights).sum(), logits)
    torch.testing.assert_close(AnswerProbability.apply(logits, 7), torch.softmax(logits, -1)[:, 7])
    torch.testing.assert_close(ours, plain)


def test_answer_probability_head_equals_softmax_of_the_linear_head_and_its_gradient():
    torch.manual_seed(0)
    weight = torch.randn(300, 16, dtype=torch.float64)
    bias = torch.randn(300, dtype=torch.float64)
    hidden = (torch.randn(5, 16, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda h: AnswerProbabilityHead.apply(h, weight, bias, 7), (hidden,))
    plain = torch.softmax(torch.nn.functional.linear(hidden, weight, bias), -1)[:, 7]
    torch.testing.assert_close(AnswerProbabilityHead.apply(hidden, weight, bias, 7), plain)
    # a bfloat16 model: float32 probabilities, the gradient in the hidden state's dtype
    low = hidden.detach().bfloat16().requires_grad_()
    prob = AnswerProbabilityHead.apply(low, weight.bfloat16(), None, 7)
    assert prob.dtype == torch.float32
    (grad,) = torch.autograd.grad(prob.sum(), low)
    assert grad.dtype == torch.bfloat16


def _logits_like_smollm2():
    """float32 logits over a 49152-token vocabulary, spread like SmolLM2's (about -20 to 30),
    with token 7 from 1 behind to 3 ahead of the best other, so that P(7) runs from 0.17 to 0.92;
    made by an exact product (multiples of 1/8) of a (B, 9) hidden state and a (V, 9) head, so
    float64 is the truth."""
    torch.manual_seed(0)
    weight = (torch.randn(49152, 9) * 11).round() / 8
    weight[:, 8] = 0
    weight[7, 8] = 1
    hidden = (torch.randn(1, 9) * 8).round().expand(8, 9).clone() / 8
    hidden[:, 8] = 0
    logits = hidden @ weight.t()
    hidden[:, 8] = (logits.amax(-1) - logits[:, 7] + torch.linspace(-1, 3, 8)).mul(8).round() / 8
    return hidden, weight


def test_answer_probability_is_accurate_near_one():
    """Both heads give P within 1e-6 of float64, where torch.softmax's faster float32 exp on CPU
    misses by 3e-6 (by 1e-5 on SmolLM2's own logits)."""
    hidden, weight = _logits_like_smollm2()
    logits = hidden @ weight.t()
    exact = torch.softmax(logits.double(), -1)[:, 7]
    assert torch.equal(logits.double(), hidden.double() @ weight.double().t())  # no rounding in the product
    assert 0.1 < exact.min() and exact.max() > 0.9
    for prob in (AnswerProbability.apply(logits, 7), AnswerProbabilityHead.apply(hidden, weight, None, 7)):
        assert (prob.double() - exact).abs().max() < 1e-6


def test_scores_are_delta_times_mean_gradient_for_one_step(tiny_llama, conflicts):
    """m = 1: the score is (a - a') * dP/da at a, checked with an independent autograd call."""
    from ircan_serve.architectures import ffn_out_projections
    from ircan_serve.attribution import _ids, last_position_ffn_inputs

    model, tok = tiny_llama.model, tiny_llama.tokenizer
    ex = conflicts[3]
    ig = ContextAwareIntegratedGradients(model, tok)
    result = ig.attribute(ex, AttributionConfig(n_steps=1, method="reference", layers=[1]))
    ids = _ids(tok, ex.prompt, torch.device("cpu"))
    a = last_position_ffn_inputs(model, ids, result.answer_token).activations[1]
    a0 = last_position_ffn_inputs(model, _ids(tok, ex.prompt_without_context, torch.device("cpu")),
                                  result.answer_token).activations[1]
    x = a.clone().requires_grad_()

    def hook(_m, args):
        h = args[0].clone()
        h[:, -1] = x
        return (h,)

    handle = ffn_out_projections(model)[1].register_forward_pre_hook(hook)
    p = torch.softmax(model(ids).logits[0, -1], -1)[result.answer_token]
    handle.remove()
    (g,) = torch.autograd.grad(p, x)
    torch.testing.assert_close(result.scores[1], (a - a0) * g, rtol=1e-5, atol=1e-9)
    assert result.scores[0].abs().sum() == 0  # unscored layer
    # the fast path's m = 1 is its unpatched row alone, read through the probe
    fast = ig.attribute(ex, AttributionConfig(n_steps=1, layers=[1])).scores[1]
    torch.testing.assert_close(fast, (a - a0) * g, rtol=1e-5, atol=1e-5 * fast.abs().max().item())
    # the effect (what the signed rule reads) is a * gradient; with m = 1 the gradient is taken at a
    moved = (a - a0) != 0
    torch.testing.assert_close(result.effect()[1][moved], (a * g)[moved], rtol=1e-4, atol=1e-9)


def test_effect_predicts_the_direction_of_scaling(tiny_llama, conflicts):
    """Scaling a neuron's output column by beta changes P(answer) by about (beta - 1) * a * g:
    the sign the signed rule relies on, checked by really scaling the columns."""
    from ircan_serve.attribution import _ids
    from ircan_serve.reweight import reweighted

    model, tok = tiny_llama.model, tiny_llama.tokenizer
    ex = conflicts[5]
    result = ContextAwareIntegratedGradients(model, tok).attribute(ex, AttributionConfig(n_steps=20))
    ids = _ids(tok, ex.prompt, torch.device("cpu"))

    def prob() -> float:
        with torch.no_grad():
            return torch.softmax(model(ids).logits[0, -1], -1)[result.answer_token].item()

    p0 = prob()
    effect = result.effect()
    top = effect.abs().flatten().argsort(descending=True)[:5].tolist()
    d_ff = effect.shape[1]
    for flat in top:
        layer, index = divmod(flat, d_ff)
        with reweighted(model, {layer: [index]}, beta=1.05):
            change = prob() - p0
        # IG's mean gradient is along the path, not at a: the sign, not the size, must agree
        assert change * effect[layer, index].item() > 0, (layer, index)


def test_bad_layers_rejected(tiny_llama, conflicts):
    ig = ContextAwareIntegratedGradients(tiny_llama.model, tiny_llama.tokenizer)
    with pytest.raises(IrcanError, match=r"layers \[5\] out of range"):
        ig.attribute(conflicts[0], AttributionConfig(layers=[5]))


def test_killed_run_resumes_without_recomputing(tmp_path, tiny_llama, conflicts, monkeypatch):
    examples = conflicts[:5]
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    full = attribute_examples(model, tok, examples, progress=False)

    calls = []
    original = ContextAwareIntegratedGradients.attribute

    def dying(self, example, config=AttributionConfig()):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is killed while attributing the third example
        calls.append(example.id)
        return original(self, example, config)

    monkeypatch.setattr(ContextAwareIntegratedGradients, "attribute", dying)
    store = AttributionStore(tmp_path / "store")
    with pytest.raises(KeyboardInterrupt):
        attribute_examples(model, tok, examples, store=store, header={"model": "tiny"}, progress=False)
    assert [store.has(e.id) for e in examples] == [True, True, False, False, False]
    assert not list((tmp_path / "store" / "examples").glob("*.tmp"))

    calls.clear()
    monkeypatch.setattr(ContextAwareIntegratedGradients, "attribute",
                        lambda self, ex, config=AttributionConfig(): (calls.append(ex.id), original(self, ex, config))[1])
    resumed = attribute_examples(model, tok, examples, store=store, header={"model": "tiny"}, progress=False)
    assert calls == [e.id for e in examples[2:]]
    for a, b in zip(full, resumed):
        assert a.example_id == b.example_id and a.answer_token == b.answer_token
        assert torch.equal(a.scores, b.scores)
    assert [r.example_id for r in store.all()] == [e.id for e in examples]


def test_store_refuses_other_settings(tmp_path, tiny_llama, conflicts):
    store = AttributionStore(tmp_path / "s")
    attribute_examples(tiny_llama.model, tiny_llama.tokenizer, conflicts[:1], store=store,
                       header={"model": "tiny"}, progress=False)
    with pytest.raises(IrcanError, match="other settings"):
        attribute_examples(tiny_llama.model, tiny_llama.tokenizer, conflicts[:1],
                           AttributionConfig(n_steps=5), store=store, header={"model": "tiny"},
                           progress=False)


def test_pass_size_is_not_a_setting_of_the_store(tmp_path, tiny_llama, conflicts):
    """The batch size changes how the work is split, not the scores: a store resumes under any
    pass size, and one written when headers still recorded it resumes too."""
    import json

    store = AttributionStore(tmp_path / "s")
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    first = attribute_examples(model, tok, conflicts[:2], AttributionConfig(internal_batch_size=40), store=store,
                               header={"model": "tiny"}, progress=False)
    header = json.loads(store.header_path.read_text())
    assert "internal_batch_size" not in header["attribution"]
    header["attribution"]["internal_batch_size"] = 120  # as older versions wrote it
    store.header_path.write_text(json.dumps(header))
    records = attribute_examples(model, tok, conflicts[:2], AttributionConfig(internal_batch_size=20),
                                 store=AttributionStore(tmp_path / "s"), header={"model": "tiny"}, progress=False)
    assert [r.example_id for r in records] == [e.id for e in conflicts[:2]]
    assert all(torch.equal(a.scores, b.scores) for a, b in zip(first, records))  # read back, not redone


def test_default_pass_size_fits_the_memory_budget(tiny_llama, conflicts, monkeypatch):
    """Short prompts run every layer's rows in one pass; a budget that holds fewer rows splits
    the layers over more passes, with the same scores."""
    from ircan_serve import attribution

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
    assert attribution._shares_prefix(model, prefix)
    per_row = attribution.PASS_MEMORY_BYTES // attribution.rows_per_pass(model, prefix, shared=True)
    monkeypatch.setattr(attribution, "PASS_MEMORY_BYTES", per_row * 5)  # 5 rows: one layer of 4 steps
    passes.clear()
    split = ig.attribute(conflicts[0], config).scores
    assert passes.count(True) == model.config.num_hidden_layers
    torch.testing.assert_close(split, one, rtol=1e-5, atol=1e-6 * one.abs().max().item())


def test_version_1_store_is_readable_for_the_paper_rule_only(tmp_path, tiny_llama, conflicts):
    """A store written before activations were kept: select works, the signed rule and resuming
    give errors that say what to do."""
    import json

    from ircan_serve.config import SelectionConfig
    from ircan_serve.selection import select_neurons

    store = AttributionStore(tmp_path / "old")
    records = attribute_examples(tiny_llama.model, tiny_llama.tokenizer, conflicts[:2],
                                 AttributionConfig(n_steps=2), store=store, progress=False)
    header = json.loads(store.header_path.read_text())
    header.pop("store_version")
    store.header_path.write_text(json.dumps(header))
    for r in records:  # rewrite each record as version 1 did: scores only
        r.activations_with = r.activations_without = None
        store.put(r)
    old = store.all()
    assert len(old) == 2 and old[0].activations_with is None
    neurons = select_neurons(old, SelectionConfig(num_neurons=2))
    assert neurons.neurons[0].effect is None
    neurons.scaled(2.0, "paper")
    with pytest.raises(IrcanError, match="no effect recorded.*version 2"):
        neurons.scaled(2.0, "signed")
    with pytest.raises(IrcanError, match="version 1.*attribute into a new folder"):
        attribute_examples(tiny_llama.model, tiny_llama.tokenizer, conflicts[:3], AttributionConfig(n_steps=2),
                           store=store, progress=False)
    with pytest.raises(IrcanError, match="version 2"):
        old[0].effect()


def test_unreadable_record_names_its_file(tmp_path, tiny_llama, conflicts):
    store = AttributionStore(tmp_path / "s")
    attribute_examples(tiny_llama.model, tiny_llama.tokenizer, conflicts[:1], AttributionConfig(n_steps=2),
                       store=store, progress=False)
    path = store._file(conflicts[0].id)
    path.write_bytes(b"garbage")
    with pytest.raises(IrcanError, match="unreadable.*delete it"):
        store.get(conflicts[0].id)


SHARED_TOKENIZERS = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "tokenizers"


@pytest.mark.skipif(not SHARED_TOKENIZERS.is_dir(), reason="../shared/tokenizers is absent")
@pytest.mark.parametrize("name, expected", [("llama2", 3681), ("phi-3", 3681), ("gpt-2", 6342),
                                            ("llama3", 12366), ("qwen", 12095)])
def test_answer_token_with_real_tokenizers(name, expected):
    """The in-context first answer token of real tokenizers (ids from ../shared/tokenizers/README.md)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SHARED_TOKENIZERS / name)
    assert answer_token_id(tok, "Context: x\nAnswer:", " Paris") == expected


@pytest.mark.skipif(not (SHARED_TOKENIZERS / "llama2").is_dir(), reason="../shared/tokenizers is absent")
def test_merged_answer_token_is_not_a_lone_sentencepiece_space():
    """When the prompt's last piece merges with the answer ('▁Pa' + 'ris' -> '▁Paris'), the answer
    token is the merged piece, not the answer encoded alone ('ris', or a lone '▁' for ' Paris')."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SHARED_TOKENIZERS / "llama2")
    assert tok.convert_ids_to_tokens(answer_token_id(tok, "Answer: Pa", "ris")) == "▁Paris"
    assert tok.convert_ids_to_tokens(answer_token_id(tok, "Answer: ", "Paris")) == "▁Paris"
    assert tok(" Paris", add_special_tokens=False)["input_ids"][0] == 29871  # what encoding alone gives


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


def _four_layer_llama(tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    cfg = tiny_config("llama", len(tiny_tokenizer))
    cfg.num_hidden_layers = 4
    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("internal_batch_size", [5, 10, 15, 100])
def test_fast_path_starting_at_the_patched_layer_equals_reference(tiny_tokenizer, conflicts, internal_batch_size):
    """Layers below each pass's lowest patched layer are replayed from the plain pass, whatever
    the chunking (1, 2, 3 or all 4 layers per pass); the scores stay the reference's."""
    model = _four_layer_llama(tiny_tokenizer)
    ig = ContextAwareIntegratedGradients(model, tiny_tokenizer)
    ex = conflicts[2]
    fast = ig.attribute(ex, AttributionConfig(n_steps=5, internal_batch_size=internal_batch_size)).scores
    ref = ig.attribute(ex, AttributionConfig(n_steps=5, method="reference")).scores
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_layers_below_the_patch_are_not_run(tiny_tokenizer, conflicts):
    """Scoring layers 2 and 3 runs layers 0-1 only in the two plain passes (without context,
    with context, whose cache cut by one token is the prefix), never in the integrated-gradient
    passes; afterwards every layer computes normally again."""
    model = _four_layer_llama(tiny_tokenizer)
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
    from ircan_serve.attribution import _cache_view, _ids

    model = _four_layer_llama(tiny_tokenizer)
    ids = _ids(tiny_tokenizer, conflicts[0].prompt, torch.device("cpu"))
    prefix = model(ids[:, :-1], use_cache=True).past_key_values
    before = [layer.keys.clone() for layer in prefix.layers]
    assert [layer.keys.shape[0] for layer in _cache_view(prefix, [0, 0, 6, 6]).layers] == [1, 1, 6, 6]
    view = _cache_view(prefix, 6)
    model(ids[:, -1:].expand(6, 1), past_key_values=view, use_cache=True)
    assert view.get_seq_length() == ids.shape[1]
    assert all(torch.equal(b, layer.keys) for b, layer in zip(before, prefix.layers))
    assert prefix.get_seq_length() == ids.shape[1] - 1


def test_each_layer_computes_only_the_rows_that_patch_it_or_a_lower_layer(tiny_tokenizer, conflicts):
    """One pass for layers 0 and 2 of 4 (m = 3: row 0, unpatched, is alpha = 1 for both layers,
    then 2 rows per layer). A patching row needs only the output projection of its own layer, so
    layer 0 computes row 0, layers 1 and 2 also the 2 rows that patch layer 0, layer 3 all 5; the
    other rows carry the recorded hidden states (plus the projection's change at their layer)."""
    model = _four_layer_llama(tiny_tokenizer)
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
    import ircan_serve.attribution as attribution

    model = _four_layer_llama(tiny_tokenizer)
    monkeypatch.setattr(attribution, "_viewable", lambda _prefix: False)
    ig = ContextAwareIntegratedGradients(model, tiny_tokenizer)
    ex = conflicts[2]
    fast = ig.attribute(ex, AttributionConfig(n_steps=3, internal_batch_size=6, layers=[1, 2])).scores
    ref = ig.attribute(ex, AttributionConfig(n_steps=3, method="reference", layers=[1, 2])).scores
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
