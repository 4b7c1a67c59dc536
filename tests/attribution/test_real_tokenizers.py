"""Tiny random models of each family paired with the family's real tokenizer
(tests/fixtures/tokenizers): the prompt renderer, the answer-token rule, attribution and selection
run the way users run them, not only on the tokenizer the fixtures train."""

import pytest
import torch

from helpers import tiny_config
from ircan_serve.answers import answer_token_id
from ircan_serve.attribution import ContextAwareIntegratedGradients
from ircan_serve.config import AttributionConfig, SelectionConfig
from ircan_serve.data import load_examples
from ircan_serve.models import load_model
from ircan_serve.prompts import QA_TEMPLATE, encode
from ircan_serve.selection import select_units

PAIRS = [  # (model_type, tokenizer folder); no Gemma tokenizer is obtainable here
    ("llama", "llama2"), ("llama", "llama3"), ("mistral", "llama2"), ("phi3", "phi-3"),
    ("qwen2", "qwen"), ("gpt2", "gpt-2"), ("gpt_neox", "gpt-neox"),
]

@pytest.fixture(scope="module", params=PAIRS, ids=[f"{m}-{t}" for m, t in PAIRS])
def paired(request, tmp_path_factory, real_tokenizers):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family, name = request.param
    tok = AutoTokenizer.from_pretrained(real_tokenizers(name))
    cfg = tiny_config(family, len(tok))
    cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    path = tmp_path_factory.mktemp(f"{family}-{name}")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return load_model(str(path)), name


def test_renderer_gives_one_bos_where_the_tokenizer_adds_it(paired):
    lm, name = paired
    tok = lm.tokenizer
    text = QA_TEMPLATE.model_input(tok, "Who wrote Hamlet?", "Hamlet was written by Marlowe.")
    ids = encode(tok, text)
    adds_bos = tok.bos_token_id is not None and tok("x")["input_ids"][0] == tok.bos_token_id
    if tok.bos_token_id is not None:
        assert ids.count(tok.bos_token_id) == (1 if adds_bos else 0)
    if adds_bos:
        assert ids[0] == tok.bos_token_id
        assert encode(tok, tok.bos_token + text) == ids  # a rendered BOS is not doubled
    assert tok.decode(ids, skip_special_tokens=True).strip() == text.strip()


def test_answer_token_is_the_in_context_first_piece(paired):
    lm, _ = paired
    tok = lm.tokenizer
    for ex in load_examples("conflicts", limit=8, tokenizer=tok).examples:
        token = answer_token_id(tok, ex.prompt, ex.answer)
        piece = tok.convert_ids_to_tokens(token)
        assert piece not in ("▁", "Ġ", " "), f"{ex.id}: lone space piece for {ex.answer!r}"
        first_word = ex.answer.split()[0]
        assert first_word.startswith(tok.decode([token]).strip()), (ex.answer, piece)
        assert encode(tok, ex.prompt + ex.answer)[len(encode(tok, ex.prompt))] == token


def test_attribution_and_selection_with_the_real_tokenizer(paired):
    lm, _ = paired
    examples = load_examples("conflicts", limit=3, tokenizer=lm.tokenizer).examples
    ig = ContextAwareIntegratedGradients(lm.model, lm.tokenizer)
    records = [ig.attribute(e, AttributionConfig(n_steps=3)) for e in examples]
    ref = ig.attribute(examples[0], AttributionConfig(n_steps=3, method="reference")).scores
    scale = ref.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(records[0].scores, ref, rtol=1e-5, atol=1e-5 * scale)
    neurons = select_units(records, SelectionConfig(num_neurons=4)).scaled(2.0, "signed")
    assert 1 <= len(neurons.neurons) <= 4
    assert all(0 <= n.layer < 2 and 0 <= n.index < 256 for n in neurons.neurons)
    assert all(f in (2.0, 0.5) for f in neurons.scales())
