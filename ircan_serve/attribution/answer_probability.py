"""P(answer token) at the last position, and its gradient, for every row of a pass.

Integrated gradients need dP(answer)/d(activation) for many rows at once. The probability is the
end of the graph, so its backward can be written for that one output instead of going through
softmax's general one:

* :class:`AnswerProbability`: from (B, V) logits, one vocabulary pass in the backward;
* :class:`AnswerProbabilityHead`: from (B, H) final hidden states and a plain linear head, with
  the gradient worked out in the forward (the fast path's head).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def softmax_(shifted: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax of logits already shifted by their maximum along ``dim``, in place, with the
    accurate ``exp``. ``torch.softmax`` on CPU uses a faster, looser exponential in float32: on
    SmolLM2's logits its P(answer) near 1 is off by ~1e-5, against 5e-7 this way (both checked
    against float64)."""
    shifted.exp_()
    return shifted.div_(shifted.sum(dim=dim, keepdim=True))


class AnswerProbability(torch.autograd.Function):
    """``softmax(logits)[:, token]`` for (B, V) logits, with a lean backward.

    It keeps the softmax and writes the (B, V) gradient ``P * (onehot - softmax)`` in one pass.
    Autograd's softmax-then-select would first fill a zero (B, V) gradient for the selection and
    then run softmax's backward over it: two more passes over the vocabulary for every row.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, token: int) -> torch.Tensor:
        probs = softmax_(logits - logits.amax(dim=-1, keepdim=True), dim=-1)  # (B, V)
        ctx.save_for_backward(probs)
        ctx.token = token
        return probs[:, token]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (probs,) = ctx.saved_tensors
        prob = probs[:, ctx.token]
        scale = grad * prob  # (B,)
        out = probs * -scale[:, None]  # -P * softmax
        out[:, ctx.token] += scale
        return out, None


class AnswerProbabilityHead(torch.autograd.Function):
    """``softmax(hidden @ weight.T + bias)[:, token]`` for (B, H) final hidden states, with its
    gradient worked out in the forward.

    P(token) is the end of the graph, so its derivative with respect to the hidden state,
    ``P * sum_v ([v = token] - p_v) w_v``, is known as soon as the softmax is: it is computed here,
    kept as a (B, H) tensor, and the backward only scales it. The (V, B) logits live in one
    buffer (softmax in place, in float32 or wider whatever the model dtype) and are freed before the
    backward, where :class:`AnswerProbability` keeps three (B, V) tensors for it. The product is
    taken as ``weight @ hidden.T``, the faster layout on CPU (BLAS streams the large weight once).
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                token: int) -> torch.Tensor:
        rows = hidden.shape[0]
        if rows % 16:  # BLAS writes (V, B) much slower when B is not a multiple of 8 (0.7x at 571 rows)
            hidden = torch.cat([hidden, hidden.new_zeros(-rows % 16, hidden.shape[1])])
        probs = torch.mm(weight, hidden.t())  # (V, B), padded
        if bias is not None:
            probs += bias[:, None]
        probs = probs.to(torch.promote_types(probs.dtype, torch.float32))  # bfloat16 logits get a float32 copy
        softmax_(probs.sub_(probs.amax(dim=0)), dim=0)  # over the vocabulary, in place
        prob = probs[token, :rows].clone()  # (B,)
        if ctx.needs_input_grad[0]:
            # sum_v (p_v - [v = token]) w_v, with the 1 taken off p_token before the product:
            # w_token - sum_v p_v w_v would cancel two nearly equal vectors when P is near 1
            probs[token] -= 1
            mixed = torch.mm(probs.t()[:rows].to(weight.dtype), weight).to(probs.dtype)  # (B, H)
            ctx.save_for_backward(prob[:, None] * -mixed)
            ctx.hidden_dtype = hidden.dtype
        return prob

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (dprob_dhidden,) = ctx.saved_tensors
        return (grad[:, None] * dprob_dhidden).to(ctx.hidden_dtype), None, None, None


def plain_output_head(model: PreTrainedModel) -> torch.nn.Linear | None:
    """The model's output head when its logits are exactly ``head(base_model(...) hidden)``, so
    that :class:`AnswerProbabilityHead` can stand in for it; None where the model changes the
    logits afterwards (Gemma 2/3's final soft-capping, Granite's logit scaling) or the head is not
    a plain ``nn.Linear``."""
    head = model.get_output_embeddings()
    config = model.config
    if type(head) is not torch.nn.Linear:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logits_scaling", 1.0) != 1.0:
        return None
    return head


def answer_prob(logits: torch.Tensor, token: int) -> torch.Tensor:
    """(B,) probability of ``token`` at the last position of (B, T, V) logits, in float32 or wider."""
    last = logits.reshape(logits.shape[0], -1) if logits.shape[1] == 1 else logits[:, -1, :]
    prob: torch.Tensor = AnswerProbability.apply(last.to(torch.promote_types(last.dtype, torch.float32)), token)
    return prob
