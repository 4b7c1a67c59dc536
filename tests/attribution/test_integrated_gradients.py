"""The integrated-gradients formula, its quadratures, and what the effect predicts."""

import pytest
import torch

from helpers import token_ids
from ircan_serve.attribution import ContextAwareIntegratedGradients
from ircan_serve.attribution.quadrature import gauss_legendre, riemann
from ircan_serve.config import AttributionConfig
from ircan_serve.errors import IrcanError


def test_riemann_points_are_the_papers():
    points = riemann(4)
    assert points.alphas.tolist() == [0.25, 0.5, 0.75, 1.0] and points.weights.tolist() == [0.25] * 4
    assert points.ends_at_target


def test_scores_are_delta_times_mean_gradient_for_one_step(tiny_llama, conflicts):
    """m = 1: the score is (a - a') * dP/da at a, checked with an independent autograd call."""
    from ircan_serve.attribution.hooks import plain_pass
    from ircan_serve.units import projections

    model, tok = tiny_llama.model, tiny_llama.tokenizer
    ex = conflicts[3]
    ig = ContextAwareIntegratedGradients(model, tok)
    result = ig.attribute(ex, AttributionConfig(n_steps=1, method="reference", layers=[1]))
    ids = token_ids(tok, ex.prompt)
    a = plain_pass(model, projections(model), ids, result.answer_token).activations[1]
    a0 = plain_pass(model, projections(model), token_ids(tok, ex.prompt_without_context),
                    result.answer_token).activations[1]
    x = a.clone().requires_grad_()

    def hook(_m, args):
        h = args[0].clone()
        h[:, -1] = x
        return (h,)

    handle = projections(model)[1].register_forward_pre_hook(hook)
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
    from ircan_serve.reweight import reweighted

    model, tok = tiny_llama.model, tiny_llama.tokenizer
    ex = conflicts[5]
    result = ContextAwareIntegratedGradients(model, tok).attribute(ex, AttributionConfig(n_steps=20))
    ids = token_ids(tok, ex.prompt)

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


def test_gauss_legendre_integrates_polynomials_exactly():
    """n nodes on [0, 1] integrate degree 2n - 1 exactly; the weights sum to 1; no node is 0 or 1."""
    for n in (1, 4, 8):
        points = gauss_legendre(n)
        assert abs(float(points.weights.sum()) - 1) < 1e-12 and not points.ends_at_target
        assert float(points.alphas.min()) > 0 and float(points.alphas.max()) < 1
        for degree in range(2 * n):
            integral = float((points.weights * points.alphas**degree).sum())
            assert abs(integral - 1 / (degree + 1)) < 1e-12, (n, degree)


def test_quadrature_names_are_the_settings():
    from typing import get_args

    from ircan_serve.attribution.quadrature import QUADRATURES

    assert set(QUADRATURES) == set(get_args(AttributionConfig.model_fields["quadrature"].annotation))


@pytest.mark.parametrize("n_steps", [3, 6])
def test_gauss_legendre_fast_equals_reference(tiny_llama, conflicts, n_steps):
    """No node is alpha = 1, so every node is a patched row (the probe row carries no weight)."""
    ig = ContextAwareIntegratedGradients(tiny_llama.model, tiny_llama.tokenizer)
    config = AttributionConfig(quadrature="gauss-legendre", n_steps=n_steps)
    fast = ig.attribute(conflicts[4], config).scores
    ref = ig.attribute(conflicts[4], config.model_copy(update={"method": "reference"})).scores
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_both_quadratures_approach_the_same_integral(tiny_llama, conflicts):
    """Gauss-Legendre with 8 nodes and the Riemann sum with 400 points estimate one integral: they
    agree far better than the paper's 20-point sum agrees with either."""
    ig = ContextAwareIntegratedGradients(tiny_llama.model, tiny_llama.tokenizer)
    ex = conflicts[4]
    fine = ig.attribute(ex, AttributionConfig(n_steps=400, layers=[1])).scores[1]
    gauss = ig.attribute(ex, AttributionConfig(quadrature="gauss-legendre", n_steps=8, layers=[1])).scores[1]
    paper = ig.attribute(ex, AttributionConfig(n_steps=20, layers=[1])).scores[1]
    scale = fine.abs().max().item()
    assert (gauss - fine).abs().max().item() < 0.01 * scale
    assert (gauss - fine).abs().max() < (paper - fine).abs().max()


def test_irrelevant_baseline_starts_the_path_after_the_rows_irrelevant_documents(tmp_path, tiny_llama, conflicts):
    """baseline = 'irrelevant': the same scores as the paper's path from a row whose prompt
    without context were the irrelevant-documents prompt; a store keeps the two apart, one written
    before the setting existed reads as 'no-context', and a row without that prompt is an error
    that says how to build one."""
    import json

    from ircan_serve.attribution import AttributionStore, attribute_examples

    model, tok = tiny_llama.model, tiny_llama.tokenizer
    ex = conflicts[4].model_copy(update={"irrelevant_prompt": f"{conflicts[9].context}\n{conflicts[4].question}"})
    ig = ContextAwareIntegratedGradients(model, tok)
    contrast = ig.attribute(ex, AttributionConfig(n_steps=4, baseline="irrelevant"))
    moved = ex.model_copy(update={"prompt_without_context": ex.irrelevant_prompt})
    torch.testing.assert_close(contrast.scores, ig.attribute(moved, AttributionConfig(n_steps=4)).scores)
    plain = ig.attribute(ex, AttributionConfig(n_steps=4))
    assert not torch.allclose(contrast.scores, plain.scores)
    assert not torch.equal(contrast.activations_without, plain.activations_without)
    torch.testing.assert_close(contrast.activations_with, plain.activations_with)

    store = AttributionStore(tmp_path / "s")
    attribute_examples(model, tok, [ex], AttributionConfig(n_steps=4), store=store, header={"model": "t"},
                       progress=False)
    header = json.loads(store.header_path.read_text())
    assert header["attribution"]["baseline"] == "no-context"
    del header["attribution"]["baseline"]  # as stores written before the setting
    store.header_path.write_text(json.dumps(header))
    attribute_examples(model, tok, [ex], AttributionConfig(n_steps=4), store=AttributionStore(tmp_path / "s"),
                       header={"model": "t"}, progress=False)  # resumes: same settings
    with pytest.raises(IrcanError, match="baseline"):
        attribute_examples(model, tok, [ex], AttributionConfig(n_steps=4, baseline="irrelevant"),
                           store=AttributionStore(tmp_path / "s"), header={"model": "t"}, progress=False)

    with pytest.raises(IrcanError, match=f"row {conflicts[4].id} .*no irrelevant-documents prompt.*contexts"):
        ig.attribute(conflicts[4], AttributionConfig(n_steps=4, baseline="irrelevant"))


def test_irrelevant_baseline_needs_a_contexts_mix_in_the_recipe(tmp_path):
    from ircan_serve.config import load_recipe

    path = tmp_path / "r.toml"
    path.write_text('model = "smollm2"\n[attribution]\nbaseline = "irrelevant"\n')
    with pytest.raises(IrcanError, match="r.toml is invalid(.|\n)*only a contexts mix builds"):
        load_recipe(path)
    path.write_text('model = "smollm2"\ncontexts = ["topk", "irrelevant"]\n[attribution]\nbaseline = "irrelevant"\n')
    with pytest.raises(IrcanError, match="score nothing"):
        load_recipe(path)
    path.write_text('model = "smollm2"\ncontexts = ["sentence", "topk"]\n[attribution]\nbaseline = "irrelevant"\n')
    assert load_recipe(path).attribution.baseline == "irrelevant"
