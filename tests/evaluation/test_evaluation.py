import json

import pytest
import torch

from ircan_serve.config import SelectionConfig
from ircan_serve.data import load_examples
from ircan_serve.errors import IrcanError
from ircan_serve.evaluation.methods import Setting, build_methods, opinion_prompt
from ircan_serve.evaluation.report import write_report
from ircan_serve.evaluation.runner import evaluate, run_method, summarize
from ircan_serve.generation import greedy_generate, naive_cad_generate
from ircan_serve.units import Unit, UnitSet

NEURONS = UnitSet(neurons=[Unit(layer=1, index=3), Unit(layer=0, index=7)],
                    selection=SelectionConfig(num_neurons=2), n_examples=1)


def test_cached_cad_equals_naive_cad(tiny_llama, conflicts):
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    rows = conflicts[:5]
    prompts, plain = [e.prompt for e in rows], [e.prompt_without_context for e in rows]
    fast = greedy_generate(model, tok, prompts, 6, cad_alpha=0.5, prompts_without_context=plain, batch_size=5)
    slow = naive_cad_generate(model, tok, prompts, plain, 6, cad_alpha=0.5)
    assert fast == slow
    # alpha = 0 is plain greedy decoding, which transformers' generate also gives
    ids = torch.tensor([tok(prompts[0])["input_ids"]])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    assert greedy_generate(model, tok, prompts[:1], 6)[0] == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)


def test_every_method_runs_on_each_task(tmp_path, tiny_llama, conflicts):
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    kre = tmp_path / "k.json"
    kre.write_text(json.dumps([{"question": "Where do fish live?", "choices": ["sea", "desert", "sky", "tree", "car"],
                                "negative_context": "Fish live in the desert.", "candidate": "B", "answer": "A"}] * 3))
    mc = load_examples(kre).examples
    methods = build_methods(["original", "ircan", "cad", "ircan+cad", "instruction", "ircan+instruction", "opinion",
                             "erase", "shrink", "random-enhance"], Setting(NEURONS.scaled(3.0), 2, 256, seeds=2))
    assert [m.seed for m in methods if m.name == "random-enhance"] == [0, 1]
    for rows in (conflicts[:4], mc):
        for m in methods:
            r = run_method(model, tok, rows, m, alpha=0.5)
            assert r.first_token.n == len(rows)
            assert (r.generation is None) == (rows[0].task == "multiple_choice")
    assert opinion_prompt(mc[0]).endswith("in Bob's opinion?\nAnswer:")
    with pytest.raises(IrcanError, match="unknown method"):
        build_methods(["magic"], Setting(NEURONS.scaled(2.0), 2, 256, 1))


def test_results_made_before_a_setting_existed_resume_under_its_old_value(tmp_path):
    """results.json written before [attribution] baseline and dev_contexts existed (and with the
    batch size, which older versions recorded) resumes under baseline = 'no-context' and no
    dev_contexts; another baseline, or dev rows in other formats, does not."""
    from ircan_serve.config import Recipe
    from ircan_serve.evaluation.runner import EvalStore

    settings = {"recipe": Recipe(name="r", contexts=["sentence", "topk"]).model_dump(), "limit": 3}
    old = json.loads(json.dumps(settings))
    del old["recipe"]["attribution"]["baseline"]
    del old["recipe"]["dev_contexts"]
    old["recipe"]["attribution"]["internal_batch_size"] = 40
    (tmp_path / "results.json").write_text(json.dumps({"settings": old, "methods": [{"method": "original"}],
                                                       "side_effects": None}))
    assert EvalStore(tmp_path, settings).data["methods"] == [{"method": "original"}]
    other = json.loads(json.dumps(settings))
    other["recipe"]["attribution"]["baseline"] = "irrelevant"
    with pytest.raises(IrcanError, match="other settings"):
        EvalStore(tmp_path, other)
    other = json.loads(json.dumps(settings))
    other["recipe"]["dev_contexts"] = ["topk", "passage-list"]
    with pytest.raises(IrcanError, match="other settings"):
        EvalStore(tmp_path, other)


def test_interrupted_eval_keeps_results_and_resumes(tmp_path, tiny_llama, conflicts, monkeypatch):
    import ircan_serve.evaluation.runner as runner

    model, tok = tiny_llama.model, tiny_llama.tokenizer
    methods = build_methods(["original", "ircan", "erase"], Setting(NEURONS.scaled(2.0), 2, 256, 1))
    original = runner.run_method
    calls = []

    def dying(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[3].name)
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "run_method", dying)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, tok, conflicts[:4], methods, tmp_path, {"s": 1}, progress=False)
    kept = json.loads((tmp_path / "results.json").read_text())
    assert [m["method"] for m in kept["methods"]] == ["original", "ircan"]
    calls.clear()
    monkeypatch.setattr(runner, "run_method", lambda *a, **k: (calls.append(a[3].name), original(*a, **k))[1])
    data = evaluate(model, tok, conflicts[:4], methods, tmp_path, {"s": 1}, progress=False)
    assert calls == ["erase"] and len(data["methods"]) == 3
    assert data["side_effects"]["top1_agreement"] <= 1.0
    with pytest.raises(IrcanError, match="other settings"):
        evaluate(model, tok, conflicts[:4], methods, tmp_path, {"s": 2}, progress=False)
    report = write_report(data, tmp_path, "tiny", neurons=[n.model_dump() for n in NEURONS.neurons], n_layers=2)
    text = report.read_text()
    assert "| ircan |" in text and "Side effects" in text
    assert (tmp_path / "neuron_layers.png").is_file() and (tmp_path / "ablations.png").is_file()
    rows = {r["method"]: r for r in summarize(data)}
    assert set(rows) == {"original", "ircan", "erase"}
    # intervals on every accuracy, the paired test against the original on the same rows
    lo, hi = rows["ircan"]["first_token.accuracy.ci"]
    assert lo <= rows["ircan"]["first_token.accuracy"] <= hi
    assert 0 <= rows["ircan"]["first_token.p_value"] <= 1 and "first_token.p_value" not in rows["original"]
    assert rows["ircan"]["agreeing.accuracy"] is not None and "agreeing accuracy" in text


def test_empty_test_split_is_an_error(tmp_path, tiny_llama):
    with pytest.raises(IrcanError, match="no rows"):
        evaluate(tiny_llama.model, tiny_llama.tokenizer, [], [], tmp_path, {})


def test_instruction_methods_render_with_the_settings_renderer_when_given(conflicts):
    from ircan_serve.config import SelectionConfig
    from ircan_serve.evaluation.methods import Setting, build_methods
    from ircan_serve.prompts import INSTRUCTION
    from ircan_serve.units import Unit, UnitSet

    units = UnitSet(neurons=[Unit(layer=0, index=1, scale=2.0)], selection=SelectionConfig(), n_examples=1, beta=2.0)
    rows = conflicts[:2]
    chat = build_methods(["instruction", "ircan+instruction"], Setting(units, 2, 8, 1, instructed=lambda e: "U:" + e.prompt))
    assert all(m.prompts(rows) == ["U:" + e.prompt for e in rows] for m in chat)
    (plain,) = build_methods(["instruction"], Setting(units, 2, 8, 1))
    assert plain.prompts(rows) == [f"{INSTRUCTION}\n{e.prompt}" for e in rows]


def test_eval_reports_the_irrelevant_check_for_weight_patches_only(tmp_path, tiny_llama, conflicts):
    """Rows with the question after other rows' documents: the original and the patch are scored
    there (the memorized answer kept), prompt methods are not; the report has the column and the
    summary its paired test."""
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    rows = [e.model_copy(update={"irrelevant_prompt": f"{conflicts[i + 1].context}\n{e.prompt_without_context}"})
            for i, e in enumerate(conflicts[:4])]
    methods = build_methods(["original", "ircan", "instruction"], Setting(NEURONS.scaled(3.0), 2, 256, seeds=1))
    data = evaluate(model, tok, rows, methods, tmp_path, {"s": 1}, progress=False)
    by_name = {m["method"]: m for m in data["methods"]}
    assert by_name["original"]["irrelevant"]["n"] == 4 and by_name["ircan"]["irrelevant"]["n"] == 4
    assert by_name["instruction"]["irrelevant"] is None
    summary = {r["method"]: r for r in summarize(data)}
    assert "irrelevant.p_value" in summary["ircan"] and "irrelevant.accuracy" in summary["original"]
    text = write_report(data, tmp_path, "tiny", neurons=[n.model_dump() for n in NEURONS.neurons], n_layers=2).read_text()
    assert "irrelevant accuracy" in text and "documents about other subjects only" in text
