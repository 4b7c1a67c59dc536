"""The answer token as it continues the prompt, and whole-word matching of answers."""

import pytest

from ircan_serve.answers import answer_matches, answer_token_id, replace_answer, until_period


def test_answer_token_keeps_leading_space(tiny_llama):
    tok = tiny_llama.tokenizer
    prompt = "Question: What is the capital of France?\nAnswer:"
    token = answer_token_id(tok, prompt, " Lyon")
    assert tok.convert_ids_to_tokens(token).startswith("Ġ")
    assert token != tok("Lyon", add_special_tokens=False)["input_ids"][0]


@pytest.mark.parametrize("name, expected", [("llama2", 3681), ("phi-3", 3681), ("gpt-2", 6342),
                                            ("llama3", 12366), ("qwen", 12095)])
def test_answer_token_with_real_tokenizers(real_tokenizers, name, expected):
    """The in-context first answer token of real tokenizers (ids in tests/fixtures/README.md)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_tokenizers(name))
    assert answer_token_id(tok, "Context: x\nAnswer:", " Paris") == expected


def test_merged_answer_token_is_not_a_lone_sentencepiece_space(real_tokenizers):
    """When the prompt's last piece merges with the answer ('▁Pa' + 'ris' -> '▁Paris'), the answer
    token is the merged piece, not the answer encoded alone ('ris', or a lone '▁' for ' Paris')."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_tokenizers("llama2"))
    assert tok.convert_ids_to_tokens(answer_token_id(tok, "Answer: Pa", "ris")) == "▁Paris"
    assert tok.convert_ids_to_tokens(answer_token_id(tok, "Answer: ", "Paris")) == "▁Paris"
    assert tok(" Paris", add_special_tokens=False)["input_ids"][0] == 29871  # what encoding alone gives


def test_answers_match_as_whole_words_ignoring_case():
    assert answer_matches("The capital is PARIS.", " Paris")
    assert not answer_matches("It was 300 years", "30")
    assert not answer_matches("Parisian food", "Paris")
    assert replace_answer("Paris is big; paris is old.", "Paris", " Lyon ") == "Lyon is big; Lyon is old."
    assert replace_answer("Lyon is big.", "Paris", "Rome") is None
    assert until_period(" Masters. And more") == "masters"
