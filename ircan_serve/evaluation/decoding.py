"""Batched greedy decoding, plain or with context-aware decoding (CAD).

CAD (Shi et al., 2023): at every step the next-token logits are

    (1 + alpha) * logits(prompt with context) - alpha * logits(prompt without context)

Both streams keep their own KV cache and advance by one token per step (:func:`greedy_generate`).
:func:`naive_cad_generate` re-runs both full sequences at every step; it exists as the
benchmark baseline and as the reference the cached version is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..prompts import encode


def _left_pad(tokenizer: Any, texts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [encode(tokenizer, t) for t in texts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)  # (B, T)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)  # (B, T)
    return input_ids, mask


class _Stream:
    """One batch of prompts decoded with a KV cache."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], device: torch.device):
        self.model = model
        self.ids, self.mask = _left_pad(tokenizer, texts, device)
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=self.ids, attention_mask=self.mask, position_ids=positions, use_cache=True)
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


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 10, *,
    cad_alpha: float | None = None, prompts_without_context: Sequence[str] | None = None,
    batch_size: int = 16,
) -> list[str]:
    """Greedy continuations of ``prompts`` (text up to EOS); CAD when ``cad_alpha`` is given."""
    if cad_alpha is not None and prompts_without_context is None:
        raise ValueError("CAD needs prompts_without_context")
    device = next(model.parameters()).device
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        ctx = _Stream(model, tokenizer, batch, device)
        plain = (_Stream(model, tokenizer, list(prompts_without_context[start : start + batch_size]), device)  # type: ignore[index]
                 if cad_alpha is not None else None)
        generated = []
        done = torch.zeros(len(batch), dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            logits = ctx.logits if plain is None else cad_logits(ctx.logits, plain.logits, cad_alpha)  # type: ignore[arg-type]
            token = logits.argmax(-1)  # (B,)
            generated.append(token)
            done |= token == tokenizer.eos_token_id
            if done.all() or step == max_new_tokens - 1:
                break
            ctx.step(token)
            if plain is not None:
                plain.step(token)
        out += _decode(tokenizer, torch.stack(generated, dim=1))
    return out


@torch.no_grad()
def naive_cad_generate(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], prompts_without_context: Sequence[str],
    max_new_tokens: int = 10, cad_alpha: float = 0.5,
) -> list[str]:
    """CAD by re-running both full sequences at every token, one prompt at a time (the baseline)."""
    device = next(model.parameters()).device
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
