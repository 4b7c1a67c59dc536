"""P(answer) and its gradient: the two autograd functions against autograd's own softmax."""

import torch

from ircan_serve.attribution.answer_probability import AnswerProbability, AnswerProbabilityHead


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
    assert exact.min() > 0.1 and exact.max() > 0.9
    for prob in (AnswerProbability.apply(logits, 7), AnswerProbabilityHead.apply(hidden, weight, None, 7)):
        assert (prob.double() - exact).abs().max() < 1e-6
