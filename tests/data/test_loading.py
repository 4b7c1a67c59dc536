import json

import pytest

from helpers import FIXTURES, write_jsonl
from ircan_serve.data import (
    DataError,
    check_prompt_lengths,
    detect_format,
    load_examples,
    shipped_conflicts_path,
)

GOOD = {"context": "The capital of France is Lyon.", "question": "What is the capital of France?",
        "answer": "Lyon", "memorized": "Paris"}


def test_shipped_set_is_large_and_valid(conflicts):
    assert len(conflicts) >= 60
    assert len({e.id for e in conflicts}) == len(conflicts)
    for e in conflicts:
        assert e.context and e.context in e.prompt and e.context not in e.prompt_without_context
        assert e.answer.startswith(" ") and e.answer.strip() != e.memorized.strip()


def test_generic_row_becomes_prompts(tmp_path):
    ex = load_examples(write_jsonl(tmp_path / "d.jsonl", [GOOD])).examples[0]
    assert ex.prompt == "Context: The capital of France is Lyon.\nQuestion: What is the capital of France?\nAnswer:"
    assert ex.prompt_without_context == "Question: What is the capital of France?\nAnswer:"
    assert (ex.answer, ex.memorized, ex.task) == (" Lyon", " Paris", "qa")


def test_memotrap_row(tmp_path):
    row = {"prompt": 'Write a quote that ends in the word "kings": No man can serve two',
           "classes": "[' masters.', ' kings.']", "answer_index": 1}
    ex = load_examples(write_jsonl(tmp_path / "m.jsonl", [row])).examples[0]
    assert detect_format(tmp_path / "m.jsonl") == "memotrap"
    assert ex.prompt_without_context == "No man can serve two"
    assert (ex.answer, ex.memorized, ex.task) == (" kings.", " masters.", "completion")


def test_kre_row(tmp_path):
    row = {"question": "Where do fish live?", "choices": ["sea", "desert", "sky", "tree", "car"],
           "negative_context": "Fish live in the desert.", "candidate": "B", "answer": "A"}
    path = tmp_path / "k.json"
    path.write_text(json.dumps([row]))
    ex = load_examples(path).examples[0]
    assert ex.task == "multiple_choice" and ex.answer == " B" and ex.memorized == " A"
    assert ex.options == [" A", " B", " C", " D", " E"]
    assert ex.prompt.startswith("Choose the correct option to answer the following question:\nFish live in the desert.\n")
    assert "B. desert" in ex.prompt and ex.prompt.endswith("Answer:")
    assert "Fish live in the desert." not in ex.prompt_without_context


@pytest.mark.parametrize("row, problem", [
    ({k: v for k, v in GOOD.items() if k != "memorized"}, "missing field 'memorized'"),
    ({**GOOD, "answer": "  "}, "empty field 'answer'"),
    ({**GOOD, "answer": "Paris"}, "answer equals the memorized answer"),
    ("{not json", "not valid JSON"),
])
def test_bad_row_names_file_line_and_problem(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, row])
    with pytest.raises(DataError, match=f"bad.jsonl:2: .*{problem}"):
        load_examples(path)


def test_skip_invalid_reports_counts(tmp_path):
    rows = [GOOD, {**GOOD, "answer": ""}, {**GOOD, "answer": ""}, {"context": "x"}, {**GOOD, "id": "b"}]
    loaded = load_examples(write_jsonl(tmp_path / "d.jsonl", rows), skip_invalid=True)
    assert len(loaded.examples) == 2 and len(loaded.skipped) == 3
    assert loaded.skip_summary() == "skipped 3 invalid rows: 2 empty field 'answer', 1 missing field 'question'"


def test_prompt_longer_than_context(tmp_path, tiny_llama):
    long = {**GOOD, "id": "long", "context": "Lyon is the capital. " * 300}
    loaded = load_examples(write_jsonl(tmp_path / "d.jsonl", [GOOD, long]))
    with pytest.raises(DataError, match=r"d.jsonl:2: prompt longer than the model's context \(\d+ > 256"):
        check_prompt_lengths(loaded, tiny_llama.tokenizer, 256)
    kept = check_prompt_lengths(loaded, tiny_llama.tokenizer, 256, skip_invalid=True)
    assert [e.id for e in kept.examples] == ["row-0"] and len(kept.skipped) == 1


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no valid rows"):
        load_examples(tmp_path / "e.jsonl")


def test_shipped_path_exists():
    assert shipped_conflicts_path().is_file()


def test_benchmark_files_load():
    """The first rows of the MemoTrap and COSE_KRE dev files (tests/fixtures/data), by format detection."""
    memo = load_examples(FIXTURES / "data" / "memotrap-dev-head.jsonl")
    cose = load_examples(FIXTURES / "data" / "cose-dev-head.json")
    assert len(memo.examples) == 12 and len(cose.examples) == 12
    assert memo.examples[0].task == "completion" and memo.template is None
    assert cose.examples[0].task == "multiple_choice" and cose.examples[0].options == [" A", " B", " C", " D", " E"]


CF_ROW = {"case_id": 12, "prompt": "Michel Denisot spoke the language", "target_new": "Russian",
          "subject": "Michel Denisot", "ground_truth": "French",
          "rephrase_prompt": "and Sallie Riley. Michel Denisot's mother tongue is",
          "locality_prompt": "The native language of Jean-Baptiste Say is", "locality_ground_truth": "French"}


def test_counterfact_row_states_target_new(tmp_path):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([CF_ROW]))
    assert detect_format(path) == "counterfact"
    loaded = load_examples(path)
    ex = loaded.examples[0]
    # the paraphrase (its junk lead-in dropped) completed with target_new, then the prompt
    assert ex.context == "Michel Denisot's mother tongue is Russian."
    assert ex.prompt == "Michel Denisot's mother tongue is Russian.\nMichel Denisot spoke the language"
    assert ex.prompt_without_context == "Michel Denisot spoke the language"
    assert (ex.id, ex.answer, ex.memorized) == ("12", " Russian", " French")
    assert ex.agreeing_prompt == "Michel Denisot's mother tongue is French.\nMichel Denisot spoke the language"
    assert (ex.locality_prompt, ex.locality_answer) == ("The native language of Jean-Baptiste Say is", " French")
    assert loaded.template.with_context == "{context}\n{question}"


def test_recipe_template_renders_every_prompt(tmp_path):
    from ircan_serve.prompts import PromptTemplate

    t = PromptTemplate(with_context="Docs:\n{context}\n\nQ: {question}\nA:", without_context="Q: {question}\nA:")
    ex = load_examples(write_jsonl(tmp_path / "d.jsonl", [GOOD]), template=t).examples[0]
    assert ex.prompt == "Docs:\nThe capital of France is Lyon.\n\nQ: What is the capital of France?\nA:"
    assert ex.agreeing_prompt == "Docs:\nThe capital of France is Paris.\n\nQ: What is the capital of France?\nA:"
    with pytest.raises(Exception, match="needs the model's tokenizer"):
        load_examples(write_jsonl(tmp_path / "d.jsonl", [GOOD]), template=t.model_copy(update={"chat": True}))


@pytest.mark.parametrize("fields, problem", [
    ({"with_context": "Q: {question}", "without_context": "Q: {question}"}, "no {context} slot"),
    ({"with_context": "{context} {question}", "without_context": "{context} {question}"}, "no {context}"),
    ({"with_context": "{context} {question} {answer}", "without_context": "{question}"}, "other than"),
])
def test_bad_template_in_a_recipe_names_the_file(tmp_path, fields, problem):
    from ircan_serve.config import load_recipe
    from ircan_serve.errors import IrcanError

    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in fields.items())
    path = tmp_path / "r.toml"
    path.write_text(f'model = "smollm2"\n[prompt]\n{body}\n')
    with pytest.raises(IrcanError, match="r.toml is invalid") as e:
        load_recipe(path)
    assert problem in str(e.value)


def test_counterfact_file_loads():
    """The first 200 rows of CounterFact's val split (tests/fixtures/data): every row is a conflict."""
    loaded = load_examples(FIXTURES / "data" / "counterfact-val-head.json", skip_invalid=True)
    assert len(loaded.examples) + len(loaded.skipped) == 200 and len(loaded.examples) > 0.95 * 200
    assert all(e.subject and e.statements for e in loaded.examples)
