"""Context-aware integrated gradients: score every FFN neuron for one conflict example.

IRCAN (NeurIPS 2024, arXiv 2406.18406), Eq. 3-4. For layer ``l`` let ``a`` be the input of the
FFN output projection at the last prompt position *with* the context and ``a'`` the same
activation *without* it. The score of neuron ``i`` is

    Attr(a_i) = (a_i - a'_i) * 1/m * sum_{k=1..m} dP(y | a' + k/m (a - a'))/da_i

where ``P(y | .)`` is the probability of the first token of the context's answer at the last
position, with only layer ``l``'s last-position activation replaced.

Two implementations compute the same numbers:

* :func:`reference_scores` -- one layer at a time over the full sequence, written to be read
  against the equation (the Captum style: the algorithm, plainly).
* :func:`fast_scores` -- patching the last position cannot change earlier positions (causal
  attention), so the prefix's KV cache is computed once and only the last token is recomputed,
  with the m steps of several layers stacked into one batch and one backward pass. Patching
  layer ``l`` cannot change layers below ``l`` either, so those layers are not run: they return
  the hidden state recorded in one plain pass, and the recomputation starts at layer ``l`` (at
  its output projection, where the FFN output joins the residual as it is). The last Riemann
  point changes nothing, so one unpatched row stands for it in every layer. All rows share the
  prompt's cache through :func:`shared_prefix_attention`, and P(answer) comes from the last
  hidden state through :class:`AnswerProbabilityHead`, whose gradient is known in the forward.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .architectures import decoder_layers, ffn_out_projections, layout_for
from .config import AttributionConfig
from .data import ConflictExample
from .errors import IrcanError
from .prompts import encode

log = logging.getLogger(__name__)


@dataclass
class Attribution:
    """The scores of one example."""

    example_id: str
    answer_token: int
    """Vocabulary id of the first token of the context's answer."""
    scores: torch.Tensor
    """(n_layers, d_ff) float32 integrated-gradient scores; rows of unscored layers are 0."""
    prob_with_context: float
    prob_without_context: float
    activations_with: torch.Tensor | None = None
    """(n_layers, d_ff) float32 activations a with the context (None in stores before version 2)."""
    activations_without: torch.Tensor | None = None
    """(n_layers, d_ff) float32 activations a' without the context."""

    def effect(self) -> torch.Tensor:
        """(n_layers, d_ff) a * mean gradient: the first-order change of P(answer) per unit of
        log-scale on each neuron's output column, i.e. d P / d log(beta) at beta = 1.

        Positive: scaling the neuron up raises P(context's answer). The IRCAN score
        (a - a') * mean gradient does not fix this sign, since SwiGLU activations are signed.
        """
        if self.activations_with is None or self.activations_without is None:
            raise IrcanError(f"the record of {self.example_id!r} has no activations: it comes from an "
                             "attribution store older than version 2; rerun `ircan attribute` into a new store")
        delta = self.activations_with - self.activations_without  # (L, d_ff)
        safe = torch.where(delta == 0, torch.ones_like(delta), delta)
        mean_grad = torch.where(delta == 0, torch.zeros_like(delta), self.scores / safe)
        return self.activations_with * mean_grad


STORE_VERSION = 2
"""Version 2 stores the with/without-context activations beside the scores (the signed rule needs them)."""


# --------------------------------------------------------------------------- tokens and hooks


def answer_token_id(tokenizer: Any, prompt: str, answer: str) -> int:
    """First token of ``answer`` as it continues ``prompt`` (leading-space form included).

    Tokenizing the bare answer word (the reference code's bug) gives ``Paris`` instead of
    `` Paris``; here the answer is tokenized in place after the prompt.
    """
    prompt_ids = encode(tokenizer, prompt)
    full_ids = encode(tokenizer, prompt + answer)
    n = len(prompt_ids)
    if full_ids[:n] == prompt_ids:
        if len(full_ids) == n:
            raise IrcanError(f"answer {answer!r} adds no token after the prompt")
        return int(full_ids[n])
    # The tokenizer merged the prompt's last token with the answer's first ("▁Pa" + "ris" ->
    # "▁Paris"): take the first token where the two encodings part, never the answer encoded
    # alone, which gives a lone "▁" piece first with SentencePiece tokenizers.
    first = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), None)
    if first is None:
        raise IrcanError(f"answer {answer!r} adds no token after the prompt")
    return int(full_ids[first])


def _ids(tokenizer: Any, text: str, device: torch.device) -> torch.Tensor:
    return torch.tensor([encode(tokenizer, text)], device=device)  # (1, T)


@contextmanager
def _patched_last_position(
    projections: Sequence[torch.nn.Module], patches: dict[int, tuple[slice, torch.Tensor]],
    probes: dict[int, torch.Tensor] | None = None,
) -> Iterator[None]:
    """Replace, for ``rows``, the last-position input of layer ``l``'s projection by ``values``.

    ``patches`` maps layer -> (rows, values) with values of shape (len(rows), d_ff). ``probes``
    maps layer -> a (d_ff,) zero tensor added to row 0's last-position input there: it changes
    nothing, and its gradient is the derivative with respect to that input, through every path.
    """

    def make_hook(rows: slice | None, values: torch.Tensor | None, probe: torch.Tensor | None
                  ) -> Callable[..., tuple[Any, ...]]:
        def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0].clone()  # (B, T, d_ff)
            if values is not None:
                x[rows, -1, :] = values.to(device=x.device, dtype=x.dtype)  # float32 points, into the model's dtype
            if probe is not None:
                x[0, -1, :] = x[0, -1, :] + probe.to(device=x.device, dtype=x.dtype)
            return (x, *args[1:])

        return hook

    probes = probes or {}
    handles = [
        projections[layer].register_forward_pre_hook(make_hook(*patches.get(layer, (None, None)), probes.get(layer)))
        for layer in sorted(set(patches) | set(probes))
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _last_logits_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    """Ask for last-position logits only, where the model supports it (saves the vocab matmul)."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@dataclass
class _Pass:
    """What one plain forward pass tells about the last position."""

    activations: torch.Tensor  # (n_layers, d_ff) FFN-output-projection inputs
    prob: float  # P(answer token)
    layer_outputs: list[Any] | None = None  # each decoder layer's output at the last position
    cache: Any = None  # the prompt's KV cache, when asked for


@torch.no_grad()
def last_position_ffn_inputs(
    model: torch.nn.Module, input_ids: torch.Tensor, token: int, *, record_layers: bool = False,
    keep_cache: bool = False,
) -> _Pass:
    """Run the prompt once; read every layer's FFN neurons and P(token) at the last position.

    ``record_layers`` keeps each decoder layer's last-position output, which
    :func:`fast_scores` replays instead of running the layers below a patched one;
    ``keep_cache`` the prompt's KV cache.
    """
    projections = ffn_out_projections(model)
    captured: list[torch.Tensor | None] = [None] * len(projections)
    outputs: list[Any] = [None] * len(projections)

    def make_hook(layer: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            # float32 whatever the model dtype, on one device even when layers are spread out
            captured[layer] = args[0][0, -1].detach().to(device=input_ids.device, dtype=torch.float32)

        return hook

    def make_recorder(layer: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            outputs[layer] = _map_hidden(output, lambda h: h[:, -1:].detach())

        return hook

    handles = [p.register_forward_pre_hook(make_hook(i)) for i, p in enumerate(projections)]
    if record_layers:
        handles += [d.register_forward_hook(make_recorder(i)) for i, d in enumerate(decoder_layers(model))]
    try:
        out = model(input_ids, use_cache=keep_cache, **_last_logits_kwargs(model))
    finally:
        for h in handles:
            h.remove()
    return _Pass(torch.stack(captured), _answer_prob(out.logits, token).item(),  # type: ignore[arg-type]
                 outputs if record_layers else None, out.past_key_values if keep_cache else None)


def _without_last_token(cache: Any) -> Any:
    """``cache`` cut to all tokens but the last (views, no copy), or None where a layer keeps a
    sliding window: cutting one fails there once the prompt is as long as the window."""
    if not _viewable(cache) or any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        return None
    cache.crop(-1)
    return cache


def _map_hidden(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to the hidden states of a decoder layer's output (a tensor, or a tuple whose
    first item is the hidden states, depending on the family and transformers version)."""
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)


def _viewable(prefix: Any) -> bool:
    """Whether ``prefix`` keeps one key and one value tensor per layer (transformers'
    ``DynamicCache`` and its sliding-window layers), so that :func:`_cache_view` can share them."""
    layers = getattr(prefix, "layers", None)
    return isinstance(layers, list) and all(
        isinstance(getattr(c, "keys", None), torch.Tensor) and isinstance(getattr(c, "values", None), torch.Tensor)
        for c in layers)


def _cache_view(prefix: Any, rows: int | Sequence[int]) -> Any:
    """A KV cache for ``rows`` copies of the prompt (one count for every layer, or one per
    layer), sharing ``prefix``'s tensors (expanded along the batch, not copied) so that running
    more tokens through it leaves ``prefix`` unchanged. A layer given 0 rows is left as it is:
    :func:`fast_scores` does not run it. Caches that are not :func:`_viewable` fall back to a deep
    copy with the largest count in every layer.
    """
    if not _viewable(prefix):
        cache = copy.deepcopy(prefix)
        most = rows if isinstance(rows, int) else max(rows)
        if most > 1:
            cache.batch_repeat_interleave(most)
        return cache
    per_layer = [rows] * len(prefix.layers) if isinstance(rows, int) else list(rows)
    view = _layer_copies(prefix)
    for own, n in zip(view.layers, per_layer):
        if n > 1:
            own.keys = own.keys.expand(n, *own.keys.shape[1:])
            own.values = own.values.expand(n, *own.values.shape[1:])
    return view


def _layer_copies(prefix: Any) -> Any:
    """A shallow copy of a :func:`_viewable` cache whose layers are shallow copies too, so that
    a pass can re-point or re-bind them without touching ``prefix``."""
    view = copy.copy(prefix)
    view.layers = [copy.copy(layer) for layer in prefix.layers]
    return view


SHARED_PREFIX_ATTENTION = "ircan_shared_prefix"
"""The name :func:`shared_prefix_attention` is registered under with transformers' attention
functions; the fast passes switch the model's attention implementation to it."""

_shared_prefix: ContextVar[tuple[Any, list[int]] | None] = ContextVar("ircan_shared_prefix", default=None)
"""During a shared-prefix pass: the prefix cache, and the layers whose attention ran."""


def shared_prefix_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
                            **_kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of each row's one new token over a prompt prefix that all rows share.

    Every row of a fast pass continues the same prompt, so the prefix's keys and values are kept
    once, (1, Hkv, P, d), never copied per row: one product per key head scores every row's
    query heads against the prefix, and each row adds its own token, whose key and value
    (``key``, ``value``: (B, Hkv, 1, d)) the pass-through cache hands over unstored. Without the
    copies and the per-row kernel calls of scaled-dot-product attention this is faster, and a
    long prompt no longer bounds the rows of a pass. Returns (B, 1, Hq, d), as transformers'
    attention functions do.
    """
    prefix, ran = _shared_prefix.get()  # type: ignore[misc]
    ran.append(module.layer_idx)
    cached = prefix.layers[module.layer_idx]
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    q = query.reshape(rows, kv_heads, group, dim)  # query head j*group + i reads key head j
    by_head = q.transpose(0, 1).reshape(kv_heads, rows * group, dim)
    on_prefix = torch.bmm(by_head, cached.keys[0].transpose(1, 2))  # (Hkv, B*group, P)
    on_own = (q * key).sum(-1).transpose(0, 1).reshape(kv_heads, rows * group, 1)
    scores = torch.cat([on_prefix, on_own], dim=-1).float() * scale
    weights = (scores - scores.amax(dim=-1, keepdim=True).detach()).exp()
    weights = (weights / weights.sum(dim=-1, keepdim=True)).to(query.dtype)  # (Hkv, B*group, P + 1)
    own_values = value.transpose(0, 1).expand(kv_heads, rows, group, dim).reshape(kv_heads, rows * group, dim)
    on_prefix_w, on_own_w = weights.split([weights.shape[-1] - 1, 1], dim=-1)  # one backward cat, no zero fills
    out = torch.bmm(on_prefix_w, cached.values[0]) + on_own_w * own_values
    return out.reshape(kv_heads, rows, group, dim).transpose(0, 1).reshape(rows, 1, heads, dim), None


def _register_shared_prefix_attention() -> None:
    """Make :data:`SHARED_PREFIX_ATTENTION` an attention implementation transformers can select
    (its mask function makes no mask: the last token sees the whole prefix)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)
    AttentionMaskInterface.register(SHARED_PREFIX_ATTENTION, lambda *_args, **_kwargs: None)


def _shares_prefix(model: torch.nn.Module, prefix: Any) -> bool:
    """Whether the fast passes can use :func:`shared_prefix_attention`: a cache with one key and
    value tensor per layer, and no attention soft-capping (Gemma 2) or GPT-2's reordered
    attention, which compute otherwise. Sliding-window layers qualify: their cache keeps exactly
    the window's earlier tokens, which is what the new token attends to."""
    config = model.config
    return (_viewable(prefix) and not getattr(config, "attn_logit_softcapping", None)
            and not getattr(config, "reorder_and_upcast_attn", False))


def _pass_through(key_states: torch.Tensor, value_states: torch.Tensor, *_args: Any, **_kwargs: Any
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    return key_states, value_states


@contextmanager
def _shared_prefix_pass(model: torch.nn.Module, prefix: Any) -> Iterator[tuple[Any, list[int]]]:
    """Run the model's attention as :func:`shared_prefix_attention` over ``prefix``.

    Yields a cache for the pass (``prefix``'s layers, whose ``update`` hands the new token's key
    and value through without storing them) and the list of layers whose attention ran.
    """
    view = _layer_copies(prefix)
    for own in view.layers:
        own.update = _pass_through
    _register_shared_prefix_attention()
    ran: list[int] = []
    token = _shared_prefix.set((prefix, ran))
    config = model.config
    saved = config._attn_implementation
    config._attn_implementation = SHARED_PREFIX_ATTENTION
    try:
        yield view, ran
    finally:
        config._attn_implementation = saved
        _shared_prefix.reset(token)


def _first_rows(value: Any, rows: int, n: int) -> Any:
    """``value`` (a layer's argument) cut to its first ``n`` of ``rows`` batch rows."""
    if isinstance(value, torch.Tensor):
        return value[:n] if value.dim() > 0 and value.shape[0] == rows else value
    if isinstance(value, (tuple, list)):
        return type(value)(_first_rows(v, rows, n) for v in value)
    return value


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def _active_rows_only(layers: Sequence[torch.nn.Module], outputs: Sequence[Any], active: Sequence[int],
                      rows: int, own: dict[int, torch.Tensor] | None = None) -> Iterator[None]:
    """Make layer ``k`` compute only its first ``active[k]`` rows; the other rows take the
    layer's recorded last-position output, plus ``own[k]`` for the rows right after the computed
    ones, if given.

    Rows are ordered by the layer they patch, so at layer ``k`` the rows that patch a layer above
    ``k`` come last, and for them nothing has changed yet: their hidden state is the plain
    pass's. ``own[k]`` ((n, H)) is how much the rows that patch layer ``k`` change its output,
    where that is known without running the layer. A layer with no row to compute is not run.
    """
    own = own or {}
    saved: list[tuple[torch.nn.Module, Any]] = []
    try:
        for k, (layer, out, n) in enumerate(zip(layers, outputs, active)):
            if n >= rows:
                continue
            saved.append((layer, layer.__dict__.get("forward")))  # an accelerate hook may live there
            original = layer.forward

            def limited(*args: Any, _out: Any = out, _n: int = n, _run: Any = original,
                        _own: torch.Tensor | None = own.get(k), **kwargs: Any) -> Any:
                recorded = _hidden(_out)  # (1, 1, H)
                n_own = 0 if _own is None else len(_own)
                parts = [recorded.expand(rows - _n - n_own, *recorded.shape[1:])]
                if _own is not None:  # the rows that patch this layer: recorded + their projection's change
                    parts.insert(0, recorded.to(_own.dtype) + _own[:, None, :])
                if _n == 0:
                    return _map_hidden(_out, lambda _h: torch.cat(parts, dim=0) if len(parts) > 1 else parts[0])
                result = _run(*(_first_rows(a, rows, _n) for a in args),
                              **{key: _first_rows(v, rows, _n) for key, v in kwargs.items()})
                return _map_hidden(result, lambda h: torch.cat([h, *(p.to(h.dtype) for p in parts)], dim=0))

            layer.forward = limited  # type: ignore[method-assign]
        yield
    finally:
        for layer, previous in saved:
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous  # type: ignore[method-assign]


def riemann_alphas(n_steps: int, device: torch.device | None = None) -> torch.Tensor:
    """Right Riemann points k/m, k = 1..m, of the paper's sum (Eq. 4). Shape (m,)."""
    return torch.arange(1, n_steps + 1, device=device, dtype=torch.float32) / n_steps


def _softmax_(shifted: torch.Tensor, dim: int) -> torch.Tensor:
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
        probs = _softmax_(logits - logits.amax(dim=-1, keepdim=True), dim=-1)  # (B, V)
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
        _softmax_(probs.sub_(probs.amax(dim=0)), dim=0)  # over the vocabulary, in place
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


def plain_output_head(model: torch.nn.Module) -> torch.nn.Linear | None:
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


def _answer_prob(logits: torch.Tensor, token: int) -> torch.Tensor:
    """(B,) probability of ``token`` at the last position of (B, T, V) logits, in float32 or wider."""
    last = logits.reshape(logits.shape[0], -1) if logits.shape[1] == 1 else logits[:, -1, :]
    return AnswerProbability.apply(last.to(torch.promote_types(last.dtype, torch.float32)), token)


# --------------------------------------------------------------------------- the two algorithms


def reference_scores(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    baseline: torch.Tensor,
    target: torch.Tensor,
    token: int,
    n_steps: int,
    layers: Sequence[int],
) -> torch.Tensor:
    """Integrated gradients one layer at a time, re-running the full sequence (for checking).

    Args:
        input_ids: (1, T) prompt with context.
        baseline: (n_layers, d_ff) activations a' without context.
        target: (n_layers, d_ff) activations a with context.
    Returns:
        (n_layers, d_ff) scores; layers not in ``layers`` stay 0.
    """
    projections = ffn_out_projections(model)
    alphas = riemann_alphas(n_steps, input_ids.device)  # (m,)
    scores = torch.zeros_like(target, dtype=torch.float32)
    batch = input_ids.expand(n_steps, -1)  # (m, T)
    head = plain_output_head(model)
    for layer in layers:
        delta = target[layer] - baseline[layer]  # (d_ff,)
        points = (baseline[layer] + alphas[:, None] * delta).requires_grad_()  # (m, d_ff)
        with _patched_last_position(projections, {layer: (slice(None), points)}):
            if head is not None:
                # the head on the (m, H) last hidden states: the model's own call on an (m, 1, H)
                # slice has a backward 10x less precise on CPU (2e-4 of the largest score on SmolLM2)
                hidden = model.base_model(batch, use_cache=False).last_hidden_state[:, -1]
                logits = head(hidden)[:, None, :]  # (m, 1, V)
            else:
                logits = model(batch, use_cache=False, **_last_logits_kwargs(model)).logits
        probs = _answer_prob(logits, token)  # (m,)
        (grads,) = torch.autograd.grad(probs.sum(), points)  # (m, d_ff)
        scores[layer] = delta.float() * grads.float().mean(dim=0)  # float32 whatever the model dtype
    return scores


def _chunks(layers: Sequence[int], per_pass: int) -> list[list[int]]:
    """Sorted layers in passes of at most ``per_pass`` layers."""
    ordered = sorted(layers)
    return [ordered[i : i + per_pass] for i in range(0, len(ordered), per_pass)]


PASS_MEMORY_BYTES = 2 * 1024**3
"""What the default pass size aims to fit: the rows' KV caches and vocabulary-sized buffers."""

FALLBACK_ROWS = 120
"""Rows per pass where the cache's size cannot be read (caches that are not viewable)."""


def rows_per_pass(model: torch.nn.Module, prefix: Any, *, shared: bool = False) -> int:
    """Rows that fit :data:`PASS_MEMORY_BYTES` in one fast pass over ``prefix``.

    Each row holds, in every layer it runs, either its attention weights over the prompt
    (``shared``: :func:`shared_prefix_attention`) or its own copy of the prompt's keys and values
    (the attention concatenates the new token to the cache), and vocabulary-sized buffers: one
    float32 column of :class:`AnswerProbabilityHead`'s logits (plus the model-dtype product when
    that is not float32), or three float32 rows (logits, softmax, their gradient) where the model's
    own head runs. Short prompts fit every layer's rows in one pass, which keeps the matrix
    products large.
    """
    if not _viewable(prefix):
        return FALLBACK_ROWS
    if shared:
        heads = getattr(model.config, "num_attention_heads", 1)
        attention = sum(2 * heads * (c.keys.shape[-2] + 1) * 4 for c in prefix.layers)  # scores, weights
    else:
        attention = sum(2 * c.keys[0].numel() * c.keys.element_size() for c in prefix.layers)
    weight = model.get_output_embeddings().weight
    vocab = weight.shape[0]
    if plain_output_head(model) is None:
        per_vocab = 3 * 4
    else:
        per_vocab = 4 + (weight.element_size() if weight.dtype != torch.float32 else 0)
    return max(1, PASS_MEMORY_BYTES // (attention + per_vocab * vocab))


def fast_scores(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    prefix: Any,
    baseline: torch.Tensor,
    target: torch.Tensor,
    token: int,
    n_steps: int,
    layers: Sequence[int],
    internal_batch_size: int | None = None,
    layer_outputs: Sequence[Any] | None = None,
) -> torch.Tensor:
    """The same scores as :func:`reference_scores`, from ``prefix``, the KV cache of all tokens
    but the last (it is read, never modified).

    Each pass recomputes only the last token, for the layers of one chunk. The last Riemann point,
    alpha = 1, patches every layer with the value it has anyway, so one unpatched row (row 0)
    stands for it in every chunk layer: its gradient at each is read through a zero probe. Rows
    ``1 + [g*(m-1), (g+1)*(m-1))`` patch layer ``chunk[g]`` with the other m - 1 points. Rows are
    independent, so one backward pass yields every layer's gradients. With ``layer_outputs``
    (each decoder layer's last-position output in the plain pass), layer ``k`` computes only row 0
    and the rows that patch a layer ``< k``, and no row below the chunk's lowest layer; the rows
    that patch layer ``k`` get its recorded output plus their output projection's change (or, where
    the FFN output does not join the residual as it is, run layer ``k`` too): a row's work starts
    at its own layer, whatever the pass size. ``internal_batch_size`` bounds the rows of a pass
    (default: :func:`rows_per_pass`).
    """
    projections = ffn_out_projections(model)
    blocks = decoder_layers(model)
    alphas = riemann_alphas(n_steps, input_ids.device)[:-1]  # (m - 1,): alpha = 1 is row 0
    steps = n_steps - 1
    last = input_ids[:, -1:]  # (1, 1)
    head = plain_output_head(model)
    shared = _shares_prefix(model, prefix)
    per_pass = max(1, (internal_batch_size or rows_per_pass(model, prefix, shared=shared)) // n_steps)
    viewable = _viewable(prefix)
    # where the FFN output joins the residual as it is, the rows that patch layer k need none of
    # layer k but its output projection: they skip the layer (a copied cache needs every row)
    skip_own = layer_outputs is not None and viewable and layout_for(model.config.model_type).adds_to_residual
    scores = torch.zeros_like(target, dtype=torch.float32)
    bypassed = False  # set once the shared-prefix attention was found bypassed
    for chunk in _chunks(layers, per_pass):
        rows = 1 + len(chunk) * steps
        # at layer k only row 0 and the rows of chunk layers <= k (< k when skipping their own
        # layer) can differ from the plain pass, so only they are computed (all rows, without
        # recorded outputs)
        below = (lambda k: sum(1 for c in chunk if c < k)) if skip_own else (lambda k: sum(1 for c in chunk if c <= k))
        active = ([1 + steps * below(k) if k >= chunk[0] else 0 for k in range(len(blocks))]
                  if layer_outputs is not None else [rows] * len(blocks))
        if not viewable:  # a copied cache holds every row in every layer it runs
            active = [rows if n else 0 for n in active]
        deltas = target[chunk] - baseline[chunk]  # (g, d_ff)
        points = (baseline[chunk][:, None, :] + alphas[None, :, None] * deltas[:, None, :])
        points = points.requires_grad_()  # (g, m - 1, d_ff)
        probes = torch.zeros_like(deltas, dtype=torch.float32).requires_grad_()  # (g, d_ff)
        # unbound once: indexing points[g] per layer would fill a zero (g, m - 1, d_ff) gradient per layer
        per_layer, probe_of = points.unbind(0), dict(zip(chunk, probes.unbind(0)))
        patches = {layer: (slice(1 + g * steps, 1 + (g + 1) * steps), per_layer[g]) for g, layer in enumerate(chunk)}
        own = {}
        if skip_own:  # each patching row's change of its layer's output: proj(point) - proj(a)
            dtype = projections[chunk[0]].weight.dtype
            own = {layer: projections[layer](per_layer[g].to(dtype)) - projections[layer](target[layer][None].to(dtype))
                   for g, layer in enumerate(chunk)}
            patches = {}

        def answer_probs(shared: bool) -> torch.Tensor:  # (rows,) P(answer) of one pass
            nonlocal bypassed
            limited = _active_rows_only(blocks, layer_outputs or [None] * len(blocks), active, rows, own)
            attention = _shared_prefix_pass(model, prefix) if shared else nullcontext((_cache_view(prefix, active), []))
            with _patched_last_position(projections, patches, probe_of), limited, \
                    attention as (cache, ran):
                if head is not None:  # the decoder, then P(answer) straight from its last hidden state
                    hidden = model.base_model(last.expand(rows, 1), past_key_values=cache, use_cache=True)
                    probs = AnswerProbabilityHead.apply(hidden.last_hidden_state[:, -1], head.weight, head.bias, token)
                else:
                    logits = model(last.expand(rows, 1), past_key_values=cache, use_cache=True,
                                   **_last_logits_kwargs(model)).logits
                    probs = _answer_prob(logits, token)
            if shared and sorted(ran) != [k for k, n in enumerate(active) if n]:
                # an attention that does not go through transformers' attention functions would
                # have seen only the new token: redo the pass, and the next ones, with copies of the prefix
                log.warning("%s attention bypasses the shared-prefix attention; using per-row caches",
                            model.config.model_type)
                bypassed = True
                return answer_probs(False)
            return probs

        probs = answer_probs(shared and not bypassed)
        on_points, at_target = torch.autograd.grad(probs.sum(), (points, probes), allow_unused=True)
        total = at_target.float() + (on_points.float().sum(dim=1) if on_points is not None else 0)  # (g, d_ff)
        scores[chunk] = deltas.float() * total / n_steps  # float32 whatever the model dtype
    return scores


# --------------------------------------------------------------------------- the public class


class ContextAwareIntegratedGradients:
    """Score FFN neurons by how much they carry the context's answer (IRCAN, Section 3.1).

    Example::

        ig = ContextAwareIntegratedGradients(loaded.model, loaded.tokenizer)
        attribution = ig.attribute(example)            # fast path, m = 20
        attribution.scores.shape                       # (n_layers, d_ff)
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, replay_lower_layers: bool = True) -> None:
        """``replay_lower_layers=False`` makes the fast path run every layer in each pass, as
        ircan-serve 0.1 did (the same scores, slower; kept so benchmarks can show the gain)."""
        self.model = model
        self.tokenizer = tokenizer
        self.n_layers = len(ffn_out_projections(model))
        self.replay_lower_layers = replay_lower_layers

    def attribute(
        self, example: ConflictExample, config: AttributionConfig = AttributionConfig()
    ) -> Attribution:
        """Scores of every neuron of ``config.layers`` (default all) for one example."""
        layers = config.layers if config.layers is not None else list(range(self.n_layers))
        bad = [layer for layer in layers if not 0 <= layer < self.n_layers]
        if bad:
            raise IrcanError(f"layers {bad} out of range: the model has {self.n_layers} layers")
        device = next(self.model.parameters()).device
        ids_with = _ids(self.tokenizer, example.prompt, device)
        ids_without = _ids(self.tokenizer, example.prompt_without_context, device)
        token = answer_token_id(self.tokenizer, example.prompt, example.answer)
        fast = config.method == "fast" and ids_with.shape[1] >= 2
        without = last_position_ffn_inputs(self.model, ids_without, token)  # a'
        with_ = last_position_ffn_inputs(self.model, ids_with, token, keep_cache=fast,
                                         record_layers=fast and self.replay_lower_layers)  # a
        args = (without.activations, with_.activations, token, config.n_steps, layers)
        if not fast:
            scores = reference_scores(self.model, ids_with, *args)
        else:
            # The cache of all tokens but the last: the prompt's own, cut by one token, or, for
            # sliding-window caches (Mistral, Gemma 2/3), from a pass of the decoder alone
            prefix = _without_last_token(with_.cache)
            if prefix is None:
                with torch.no_grad():
                    prefix = self.model.base_model(ids_with[:, :-1], use_cache=True).past_key_values
            scores = fast_scores(self.model, ids_with, prefix, *args, config.internal_batch_size,
                                 layer_outputs=with_.layer_outputs)
        return Attribution(
            example.id, token, scores.detach().float().cpu(), with_.prob, without.prob,
            activations_with=with_.activations.float().cpu(),
            activations_without=without.activations.float().cpu(),
        )


# --------------------------------------------------------------------------- the store


class AttributionStore:
    """Attribution results on disk, one safetensors file per example, written as computed.

    Layout: ``DIR/header.json`` (model, data, settings) and ``DIR/examples/<hash>.safetensors``
    (float32 scores + id and answer token in the metadata). Each file is written to a temporary
    name and renamed, so a killed run leaves only complete records and resumes after them.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def header_path(self) -> Path:
        return self.path / "header.json"

    def _file(self, example_id: str) -> Path:
        digest = hashlib.sha256(example_id.encode()).hexdigest()[:20]
        return self.path / "examples" / f"{digest}.safetensors"

    def open(self, header: dict[str, Any]) -> None:
        """Create the store, or check that an existing one was made with the same settings."""
        header = {**header, "store_version": STORE_VERSION}
        if self.header_path.is_file():
            existing = json.loads(self.header_path.read_text())
            # older stores recorded the batch size, which does not change the scores
            existing.get("attribution", {}).pop("internal_batch_size", None)
            if existing.get("store_version", 1) != STORE_VERSION:
                raise IrcanError(
                    f"attribution store {self.path} is version {existing.get('store_version', 1)} "
                    f"(this ircan-serve writes version {STORE_VERSION}, which adds the activations "
                    "the signed rule needs); it can still be read by `ircan select --rule paper`, "
                    "but to resume or extend it, attribute into a new folder"
                )
            if existing != header:
                diff = {k: (existing.get(k), v) for k, v in header.items() if existing.get(k) != v}
                raise IrcanError(
                    f"attribution store {self.path} was made with other settings {diff}; "
                    "use another folder or delete it"
                )
            return
        (self.path / "examples").mkdir(parents=True, exist_ok=True)
        self.header_path.write_text(json.dumps(header, indent=2))

    def header(self) -> dict[str, Any]:
        if not self.header_path.is_file():
            raise IrcanError(f"{self.path} is not an attribution store (no header.json)")
        return json.loads(self.header_path.read_text())

    def has(self, example_id: str) -> bool:
        return self._file(example_id).is_file()

    def put(self, attribution: Attribution) -> None:
        path = self._file(attribution.example_id)
        tmp = path.with_suffix(".tmp")
        meta = {
            "example_id": attribution.example_id,
            "answer_token": str(attribution.answer_token),
            "prob_with_context": repr(attribution.prob_with_context),
            "prob_without_context": repr(attribution.prob_without_context),
        }
        tensors = {"scores": attribution.scores.contiguous()}
        if attribution.activations_with is not None and attribution.activations_without is not None:
            tensors["activations_with"] = attribution.activations_with.contiguous()
            tensors["activations_without"] = attribution.activations_without.contiguous()
        save_file(tensors, str(tmp), metadata=meta)
        tmp.rename(path)

    def get(self, example_id: str) -> Attribution:
        from safetensors import SafetensorError, safe_open

        path = self._file(example_id)
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
            tensors = load_file(str(path))
            return Attribution(
                example_id=meta["example_id"],
                answer_token=int(meta["answer_token"]),
                scores=tensors["scores"],
                prob_with_context=float(meta["prob_with_context"]),
                prob_without_context=float(meta["prob_without_context"]),
                activations_with=tensors.get("activations_with"),
                activations_without=tensors.get("activations_without"),
            )
        except (OSError, KeyError, ValueError, TypeError, SafetensorError) as e:
            raise IrcanError(f"attribution record {path} (example {example_id!r}) is unreadable: {e}; "
                             "delete it and rerun `ircan attribute` to recompute it") from e

    def all(self) -> list[Attribution]:
        """Every stored record, in the order of the header's example ids."""
        ids = self.header().get("example_ids", [])
        return [self.get(i) for i in ids if self.has(i)]


def examples_to_do(examples: Sequence[ConflictExample], config: AttributionConfig,
                   store: AttributionStore | None, header: dict[str, Any] | None) -> list[ConflictExample]:
    """Open ``store`` for this run (or check it was made with the same settings) and return the
    examples it does not hold yet: all of them without a store."""
    if store is None:
        return list(examples)
    store.open({**(header or {}), "attribution": config.model_dump(), "example_ids": [e.id for e in examples]})
    todo = [e for e in examples if not store.has(e.id)]
    if len(todo) < len(examples):
        log.info("resuming: %d of %d examples already attributed", len(examples) - len(todo), len(examples))
    return todo


def attribute_examples(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[ConflictExample],
    config: AttributionConfig = AttributionConfig(),
    *,
    store: AttributionStore | None = None,
    header: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[Attribution]:
    """Attribute every example, skipping those already in ``store`` (resume after a kill)."""
    from tqdm.auto import tqdm

    ig = ContextAwareIntegratedGradients(model, tokenizer)
    todo = examples_to_do(examples, config, store, header)
    results: list[Attribution] = []
    bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc="attribution",
               unit="ex", disable=not progress)
    with bar:
        for example in examples:
            if store is not None and store.has(example.id):
                results.append(store.get(example.id))
                continue
            result = ig.attribute(example, config)
            if store is not None:
                store.put(result)
            results.append(result)
            bar.update(1)
    return results
