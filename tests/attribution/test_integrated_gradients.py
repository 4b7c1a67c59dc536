"""The integrated-gradients formula, its quadratures, and what the effect predicts."""

import pytest
import torch

from helpers import token_ids
from ircan_serve.attribution import ContextAwareIntegratedGradients
from ircan_serve.attribution.quadrature import riemann
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
