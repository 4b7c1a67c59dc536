"""The known-facts filter and `ircan conflicts` (unit: tiny model; e2e: SmolLM2)."""

import json

import pytest

from helpers import FIXTURES, write_jsonl
from ircan_serve.conflicts import answer_kind, build_conflicts, known_facts
from ircan_serve.errors import IrcanError


def test_answer_kinds():
    assert answer_kind("In which year did X happen?", "1969") == "year|which year"
    assert answer_kind("How many legs has a spider?", "8") == "number|how many"
    assert answer_kind("Which country is largest?", "Russia") == answer_kind("Which country is hot?", "Chad")
    assert answer_kind("Which country is largest?", "Russia") != answer_kind("Which country?", "1969")
    assert answer_kind("Who wrote Hamlet?", "Shakespeare").startswith("name|who")


def test_known_filter_that_keeps_nothing_names_the_file(tiny_llama, conflicts):
    # a random tiny model knows none of the memorized answers
    with pytest.raises(IrcanError, match="mydata.json: the known-facts filter kept none of 6 rows"):
        known_facts(tiny_llama.model, tiny_llama.tokenizer, conflicts[:6], progress=False, source="mydata.json")


def test_conflicts_from_qa_pairs_report_every_drop(tmp_path, tiny_llama, monkeypatch):
    import ircan_serve.conflicts as conflicts_module

    rows = [{"id": "a", "question": "Which country is the most populous?", "answer": "India"},
            {"id": "b", "question": "Which country has the largest area?", "answer": "Russia"},
            {"id": "c", "question": "Which city hosts the Louvre?", "answer": "Paris",
             "passage": "The Louvre is a museum in Paris, France."},
            {"id": "d", "question": "Who painted the Mona Lisa?", "answer": "Leonardo"},
            {"id": "e", "question": "Which city hosts the Prado?", "answer": "Madrid",
             "passage": "The Prado is a famous museum."},
            {"id": "f", "question": "Which city hosts the Uffizi?", "answer": "Florence"},
            {"id": "g", "question": "", "answer": "x"}]
    src = write_jsonl(tmp_path / "qa.jsonl", rows)
    # closed-book answers: the model "knows" every row but f (the generation itself is tested in e2e)
    answers = {r["question"]: (" " + r["answer"] if r["id"] != "f" else " Rome") for r in rows}
    monkeypatch.setattr(conflicts_module, "greedy_generate",
                        lambda m, t, prompts, n, **k: [next(a for q, a in answers.items() if q and q in p) for p in prompts])
    report = build_conflicts(tiny_llama.model, tiny_llama.tokenizer, src, tmp_path / "out.jsonl")
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in out}
    assert set(by_id) == {"a", "b", "c"}
    assert by_id["a"]["answer"] == "Russia" and by_id["a"]["memorized"] == "India"
    assert by_id["a"]["context"] == 'The answer to "Which country is the most populous?" is Russia.'
    assert by_id["c"]["context"] == "The Louvre is a museum in Madrid, France." and by_id["c"]["answer"] == "Madrid"
    assert by_id["c"]["agreeing_context"] == "The Louvre is a museum in Paris, France."
    assert report.written == 3 and report.rows == 7
    assert report.dropped == {"needs non-empty 'question' and 'answer'": 1,
                              "the model does not answer it closed-book": 1,
                              "no other answer of the same kind": 1,
                              "the passage does not state the answer": 1}
    assert json.loads((tmp_path / "out.report.json").read_text())["written"] == 3
    # the output is a valid generic conflict set
    from ircan_serve.data import load_examples
    assert len(load_examples(tmp_path / "out.jsonl").examples) == 3


def test_conflicts_missing_or_empty_input(tmp_path, tiny_llama):
    with pytest.raises(IrcanError, match="does not exist"):
        build_conflicts(tiny_llama.model, tiny_llama.tokenizer, tmp_path / "none.jsonl", tmp_path / "o.jsonl")
    src = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q?", "answer": ""}])
    with pytest.raises(IrcanError, match="no usable QA pairs"):
        build_conflicts(tiny_llama.model, tiny_llama.tokenizer, src, tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.e2e
def test_smollm2_conflicts_from_qa_pairs(tmp_path, smollm2):
    rows = [{"question": "What is the capital of France?", "answer": "Paris"},
            {"question": "What is the capital of Italy?", "answer": "Rome"},
            {"question": "What is the capital of Japan?", "answer": "Tokyo"},
            {"question": "What is the capital of Narnia?", "answer": "Cair Paravel"}]
    src = write_jsonl(tmp_path / "qa.jsonl", rows)
    # the instruct model answers through its chat template (after a bare "Answer:" it ends its turn)
    from ircan_serve.prompts import QA_TEMPLATE

    with pytest.raises(IrcanError, match="does not answer it closed-book': 4"):
        build_conflicts(smollm2.model, smollm2.tokenizer, src, tmp_path / "plain.jsonl")
    chat = QA_TEMPLATE.model_copy(update={"chat": True})
    report = build_conflicts(smollm2.model, smollm2.tokenizer, src, tmp_path / "c.jsonl", template=chat)
    out = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert report.written == len(out) == 3  # France, Italy, Japan; Narnia is not answered
    for r in out:
        assert r["answer"] != r["memorized"] and r["answer"] in {"Paris", "Rome", "Tokyo"}
        assert r["answer"] in r["context"]
    assert sum(report.dropped.values()) == len(rows) - len(out)


def test_smollm2_knows_some_counterfact_rows(smollm2):
    from ircan_serve.data import load_examples

    rows = load_examples(FIXTURES / "data" / "counterfact-val-head.json", limit=200, skip_invalid=True).examples
    kept, report = known_facts(smollm2.model, smollm2.tokenizer, rows, progress=False)
    # the model knows some facts but far from all (FINDINGS: a few percent by first token)
    assert 0 < report.kept < 0.5 * len(rows) and [e.id for e in kept] == report.kept_ids


def test_the_shipped_counterfact_rows_are_what_the_filter_keeps(smollm2, tmp_path):
    """The shipped subset is a cached artifact: rebuilding it (``ircan known``) on the first 150
    rows of CounterFact's train split keeps exactly the shipped rows among them, unchanged."""
    from ircan_serve.conflicts import write_known_rows
    from ircan_serve.data import data_path

    head = FIXTURES / "data" / "counterfact-train-head.json"
    out = tmp_path / "known.json"
    report = write_known_rows(smollm2.model, smollm2.tokenizer, head, out, progress=False)
    head_ids = {r["case_id"] for r in json.loads(head.read_text())}
    shipped = [r for r in json.loads(data_path("counterfact-smollm2").read_text()) if r["case_id"] in head_ids]
    assert json.loads(out.read_text()) == shipped and report.kept == len(shipped) == 9 and report.checked == 150
