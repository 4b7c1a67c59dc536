"""Running a model on prompts: left-padded batches, last-position logits, greedy and CAD decoding.

CAD (context-aware decoding, Shi et al., 2023): at every step the next-token logits are

    (1 + alpha) * logits(prompt with context) - alpha * logits(prompt without context)

Both streams keep their own KV cache and advance by one token per step (:func:`greedy_generate`).
:func:`naive_cad_generate` re-runs both full sequences at every step; it is the benchmark's
baseline and the reference the cached version is tested against.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .prompts import encode

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def pad_id(tokenizer: Any) -> int:
    """The id that fills the left of shorter prompts (the pad token, else EOS)."""
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def left_pad(tokenizer: Any, texts: Sequence[str], device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), each (B, T), of ``texts`` padded on the left,
    with positions counted from each prompt's own first token."""
    ids = [encode(tokenizer, t) for t in texts]
    width = max(map(len, ids))
    pad = pad_id(tokenizer)
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)  # (B, T)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)  # (B, T)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    return input_ids, mask, positions


def last_logits_kwargs(model: PreTrainedModel) -> dict[str, Any]:
    """Ask for last-position logits only, where the model supports it (saves the vocab matmul)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def model_device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def next_token_logits(model: PreTrainedModel, tokenizer: Any, prompts: Sequence[str],
                      batch_size: int = 16, *, all_positions: bool = False) -> torch.Tensor:
    """(N, V) next-token logits at the end of each prompt, left-padded in batches.

    Only the last position's logits are computed (``logits_to_keep=1``, as attribution does):
    the vocabulary projection of every other position is the bulk of the time and memory on long
    RAG prompts. ``all_positions=True`` computes them all and keeps the last (the benchmark's
    baseline; same numbers).
    """
    device = model_device(model)
    keep = {} if all_positions else last_logits_kwargs(model)
    # batches of similar length: a mix of one-sentence and passage contexts pads far less
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = [prompts[i] for i in order[start : start + batch_size]]
        input_ids, mask, positions = left_pad(tokenizer, batch, device)
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                       use_cache=False, **keep).logits[:, -1, :]  # (B, V)
        out.append(logits.float().cpu())
    if not out:
        return torch.empty(0)
    result = torch.empty_like(stacked := torch.cat(out))
    result[torch.tensor(order)] = stacked
    return result


class _Stream:
    """One batch of prompts decoded with a KV cache."""

    def __init__(self, model: PreTrainedModel, tokenizer: Any, texts: Sequence[str], device: torch.device):
        self.model = model
        ids, self.mask, positions = left_pad(tokenizer, texts, device)
        out = model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True)
        self.cache = out.past_key_values
        self.logits = out.logits[:, -1, :].float()  # (B, V)
        self.next_pos = self.mask.sum(-1, keepdim=True)  # (B, 1)

    def step(self, token: torch.Tensor) -> None:
        """Append ``token`` (B,) and compute the next logits from the cache."""
        self.mask = torch.cat([self.mask, torch.ones_like(token)[:, None]], dim=-1)
        out = self.model(input_ids=token[:, None], attention_mask=self.mask, position_ids=self.next_pos,
                         past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.logits = out.logits[:, -1, :].float()
        self.next_pos = self.next_pos + 1


def cad_logits(with_context: torch.Tensor, without_context: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 + alpha) * with - alpha * without."""
    return (1 + alpha) * with_context - alpha * without_context


def _decode(tokenizer: Any, generated: torch.Tensor) -> list[str]:
    eos = tokenizer.eos_token_id
    texts = []
    for row in generated.tolist():
        if eos in row:
            row = row[: row.index(eos)]
        texts.append(tokenizer.decode(row))
    return texts


def _greedy_batch(model: PreTrainedModel, tokenizer: Any, prompts: list[str], plain: list[str] | None,
                  alpha: float, max_new_tokens: int) -> list[str]:
    device = model_device(model)
    ctx = _Stream(model, tokenizer, prompts, device)
    without = _Stream(model, tokenizer, plain, device) if plain is not None else None
    generated = []
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        logits = ctx.logits if without is None else cad_logits(ctx.logits, without.logits, alpha)
        token = logits.argmax(-1)  # (B,)
        generated.append(token)
        done |= token == tokenizer.eos_token_id
        if done.all() or step == max_new_tokens - 1:
            break
        ctx.step(token)
        if without is not None:
            without.step(token)
    return _decode(tokenizer, torch.stack(generated, dim=1))


@torch.no_grad()
def greedy_generate(
    model: PreTrainedModel, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 10, *,
    cad_alpha: float | None = None, prompts_without_context: Sequence[str] | None = None,
    batch_size: int = 16,
) -> list[str]:
    """Greedy continuations of ``prompts`` (text up to EOS); CAD when ``cad_alpha`` is given."""
    if cad_alpha is not None and prompts_without_context is None:
        raise ValueError("CAD needs prompts_without_context")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # batches of similar length
    out: dict[int, str] = {}
    for start in range(0, len(prompts), batch_size):
        idx = order[start : start + batch_size]
        plain = ([prompts_without_context[i] for i in idx]
                 if cad_alpha is not None and prompts_without_context is not None else None)
        texts = _greedy_batch(model, tokenizer, [prompts[i] for i in idx], plain, cad_alpha or 0.0, max_new_tokens)
        out.update(zip(idx, texts))
    return [out[i] for i in range(len(prompts))]


@torch.no_grad()
def naive_cad_generate(
    model: PreTrainedModel, tokenizer: Any, prompts: Sequence[str], prompts_without_context: Sequence[str],
    max_new_tokens: int = 10, cad_alpha: float = 0.5,
) -> list[str]:
    """CAD by re-running both full sequences at every token, one prompt at a time (the baseline)."""
    device = model_device(model)
    out = []
    for p, q in zip(prompts, prompts_without_context):
        a = torch.tensor([encode(tokenizer, p)], device=device)
        b = torch.tensor([encode(tokenizer, q)], device=device)
        generated = []
        for _ in range(max_new_tokens):
            logits = cad_logits(model(a, use_cache=False).logits[0, -1].float(),
                                model(b, use_cache=False).logits[0, -1].float(), cad_alpha)
            token = int(logits.argmax())
            generated.append(token)
            if token == tokenizer.eos_token_id:
                break
            a = torch.cat([a, a.new_tensor([[token]])], dim=1)
            b = torch.cat([b, b.new_tensor([[token]])], dim=1)
        out += _decode(tokenizer, torch.tensor([generated]))
    return out
