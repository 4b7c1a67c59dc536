"""Helpers the tests import (the fixtures are in conftest.py): tiny configs, fixture paths, files."""

from __future__ import annotations

import json
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
"""Data the tests carry: real tokenizers' vocabularies, small slices of the benchmark files."""

FAMILIES = ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "gpt_neox"]
"""The families with a tiny random model in the session fixture ``tiny_model_dirs``."""

API_KEY = "ircan-test-key"
"""The key the session's live vLLM server requires."""


def tiny_config(model_type: str, vocab_size: int):
    """A 2-layer random config of ``model_type`` with hidden 128 and head_dim 64."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=128, n_layer=2, n_head=2, n_inner=256,
                                    n_positions=256, **common)
    if model_type == "gpt_neox":
        return AutoConfig.for_model("gpt_neox", hidden_size=128, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=256,
                                    max_position_embeddings=256, **common)
    extra = {"head_dim": 64} if model_type in ("gemma", "qwen3", "mistral") else {}
    return AutoConfig.for_model(
        model_type, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=256, max_position_embeddings=256,
        tie_word_embeddings=False, **extra, **common,
    )


def four_layer_llama(tokenizer):
    """A 4-layer random Llama on ``tokenizer`` (passes over several layers need more than 2)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama", len(tokenizer))
    cfg.num_hidden_layers = 4
    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(cfg).eval()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def token_ids(tokenizer, text: str):
    """(1, T) token ids of ``text`` as the product encodes prompts."""
    import torch

    from ircan_serve.prompts import encode

    return torch.tensor([encode(tokenizer, text)])


def real_tokenizer_dir(name: str, into: Path) -> Path:
    """A tokenizer folder of ``fixtures/tokenizers/NAME``, its ``tokenizer.json`` decompressed into ``into``."""
    import lzma
    import shutil

    source = FIXTURES / "tokenizers" / name
    target = into / name
    if not (target / "tokenizer.json").is_file():
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / "tokenizer_config.json", target / "tokenizer_config.json")
        (target / "tokenizer.json").write_bytes(lzma.decompress((source / "tokenizer.json.xz").read_bytes()))
    return target


def teacher_forced_logprobs(model, prompt_ids, new_ids):
    """(len(new_ids),) log-probabilities ``model`` gives each of ``new_ids`` after ``prompt_ids`` (1, T)."""
    import torch

    new = torch.as_tensor(list(new_ids), device=prompt_ids.device)
    ids = torch.cat([prompt_ids, new[None]], dim=1)
    with torch.no_grad():
        logits = model(ids).logits[0, prompt_ids.shape[1] - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, new[:, None])[:, 0].cpu()
