"""Gemma 3 270M, the second real model: the family where the fast path's special cases live
(post-FFN norm, sliding-window layers, QK norm, a 262k-token vocabulary, tied embeddings)."""

from pathlib import Path

import pytest
import torch

from helpers import FIXTURES
from ircan_serve.attribution import ContextAwareIntegratedGradients
from ircan_serve.config import AttributionConfig
from ircan_serve.data import load_examples

LAYERS = [0, 5, 11, 17]
"""Sliding-window layers (0, 11) and global ones (5, 17)."""


@pytest.mark.parametrize("source", ["memotrap", "conflicts"])
def test_fast_equals_reference_on_gemma3(gemma3, source):
    """In float32, within 1e-5 of the largest score, on a MemoTrap row and a shipped conflict."""
    path = FIXTURES / "data" / "memotrap-dev-head.jsonl" if source == "memotrap" else "conflicts"
    example = load_examples(path, limit=13, tokenizer=gemma3.tokenizer).examples[-1]
    assert gemma3.model.config.model_type == "gemma3_text"
    ig = ContextAwareIntegratedGradients(gemma3.model, gemma3.tokenizer)
    fast = ig.attribute(example, AttributionConfig(layers=LAYERS, n_steps=8)).scores
    ref = ig.attribute(example, AttributionConfig(layers=LAYERS, n_steps=8, method="reference")).scores
    scale = ref.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5 * scale)


def test_gemma3_prompts_start_with_its_bos_and_follow_the_context(gemma3):
    """The GGUF asks for a BOS (``tokenizer.ggml.add_bos_token``), which transformers' GGUF loader
    drops; without it Gemma 3 answers " Question" to every shipped conflict. The converted
    tokenizer adds it, and the model then gives the context's answer on the first rows."""
    from ircan_serve.answers import answer_token_id
    from ircan_serve.prompts import encode

    tok = gemma3.tokenizer
    for example in load_examples("conflicts", limit=4, tokenizer=tok).examples:
        ids = encode(tok, example.prompt)
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        with torch.no_grad():
            top = int(gemma3.model(torch.tensor([ids])).logits[0, -1].argmax())
        assert top == answer_token_id(tok, example.prompt, example.answer), example.id


def test_a_folder_converted_before_the_bos_fix_gets_its_tokenizer_rewritten(gemma3, tmp_path, monkeypatch):
    """A cached folder without ``ircan-conversion.json`` (version 1: a tokenizer without the BOS)
    keeps its weights and gets the GGUF's tokenizer, flags included, and the stamp."""
    from transformers import AutoTokenizer

    from ircan_serve import models

    gguf = models.embedded_gguf("gemma3-270m")
    source = Path(models.resolve_model("gemma3-270m"))
    monkeypatch.setenv("IRCAN_CACHE", str(tmp_path))
    old = tmp_path / "gemma-3-270m-f32"
    old.mkdir()
    (old / "config.json").write_text((source / "config.json").read_text())
    (old / "model.safetensors").symlink_to(source / "model.safetensors")
    without_bos = AutoTokenizer.from_pretrained(source)
    without_bos.add_bos_token = False
    without_bos.update_post_processor()
    without_bos.save_pretrained(old)
    assert AutoTokenizer.from_pretrained(old)("hi")["input_ids"][0] != without_bos.bos_token_id

    assert models._convert_gguf(gguf, "gemma-3-270m-f32") == old
    assert AutoTokenizer.from_pretrained(old)("hi")["input_ids"][0] == without_bos.bos_token_id
    assert (old / "model.safetensors").is_symlink()  # the weights were not converted again
    assert (old / "ircan-conversion.json").is_file()
    assert models._read_stamp(old)["conversion"] == models.CONVERSION
