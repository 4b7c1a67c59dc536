import pytest
import torch

from ircan_serve.attribution import (
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
