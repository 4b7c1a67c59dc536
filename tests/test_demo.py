from ircan_serve.answers import answer_matches
from ircan_serve.demo import held_out_questions


def test_answer_matching_is_by_whole_words():
    assert answer_matches("The freezing point is 30 degrees", "30")
    assert not answer_matches("The freezing point is 30 degrees", "0")
    assert answer_matches("It is India.", " india")
    assert not answer_matches("Indiana", "India")


def test_demo_questions_are_held_out_of_the_recipe():
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "export" / "smollm2-conflicts.toml"
    rows, held = held_out_questions(recipe)
    assert len(rows) == 72 and len(held) == 24
    assert {e.id for e in held}.isdisjoint(e.id for e in rows[:48])


def _rows(answers: dict[str, list[str]]):
    from ircan_serve.data import load_examples
    from ircan_serve.demo import DemoRow

    ex = load_examples("conflicts").examples[0]  # answer Lyon, memorized Paris
    n = len(next(iter(answers.values())))
    return ex, [DemoRow(ex, ex.context or "", {m: a[i] for m, a in answers.items()}) for i in range(n)]


def test_demo_setting_summary_has_intervals_and_tests_against_original_and_instruction():
    from ircan_serve.demo import summarize_setting

    # the patch follows on 12 more rows than the original, and on 7 more than the instruction
    _, rows = _rows({"original": ["Lyon"] * 5 + ["Paris"] * 15,
                     "instruction": ["Lyon"] * 10 + ["Paris"] * 10,
                     "IRCAN": ["Lyon"] * 17 + ["Paris"] * 3})
    out = summarize_setting(rows)
    m = out["methods"]
    assert [m[k]["goal"]["k"] for k in ("original", "instruction", "IRCAN")] == [5, 10, 17]
    lo, hi = m["IRCAN"]["goal"]["ci"]
    assert lo < 17 / 20 < hi
    assert m["IRCAN"]["vs original"]["b_only"] == 12 and m["IRCAN"]["vs original"]["p_value"] < 0.001
    assert m["IRCAN"]["vs instruction"]["b_only"] == 7 and m["IRCAN"]["vs instruction"]["a_only"] == 0
    assert m["original"]["vs original"] is None and m["IRCAN"]["memorized"]["k"] == 3
    assert "own_document" not in out and "vs CAD" not in m["IRCAN"]
    assert out["outcomes"]["IRCAN"] == "1" * 17 + "0" * 3 and len(out["outcomes"]["ids"]) == 20


def test_ircan_plus_cad_is_also_tested_against_cad_on_the_questions_both_answered():
    from ircan_serve.demo import summarize_setting

    _, rows = _rows({"original": ["Paris"] * 20, "CAD": ["Lyon"] * 8 + ["Paris"] * 12,
                     "IRCAN+CAD": ["Lyon"] * 14 + ["Paris"] * 6})
    for r in rows[10:]:  # CAD asked of the first 10 only (--cad-limit)
        del r.answers["CAD"], r.answers["IRCAN+CAD"]
    out = summarize_setting(rows)
    t = out["methods"]["IRCAN+CAD"]["vs CAD"]
    assert (t["n"], t["a_only"], t["b_only"]) == (10, 0, 2)
    assert out["outcomes"]["CAD"] == "1" * 8 + "00" + "-" * 10


def test_irrelevant_setting_counts_the_kept_memorized_answer():
    from ircan_serve.demo import summarize_setting

    _, rows = _rows({"original": ["Paris"] * 8 + ["Lyon"] * 2, "IRCAN": ["Paris"] * 5 + ["Lyon"] * 5})
    for r, own in zip(rows, [True] * 9 + [False]):
        r.own_document = own
    out = summarize_setting(rows, relevant=False)
    assert out["goal"] == "keeps its own answer"
    assert out["methods"]["original"]["goal"]["k"] == 8 and out["methods"]["IRCAN"]["goal"]["k"] == 5
    assert out["methods"]["IRCAN"]["vs original"]["a_only"] == 3
    assert out["own_document"]["k"] == 9


def test_side_checks_summary_pairs_original_and_patch():
    from ircan_serve.demo import DemoSet, summarize_set

    ex, rows = _rows({"original": ["Lyon"] * 20, "IRCAN": ["Lyon"] * 20})
    for i, r in enumerate(rows):
        r.agreeing = {"original": "Paris", "IRCAN": "Paris" if i else "Lyon"}
    s = DemoSet("t", None, None, [ex], [ex] * 20, rows, {"retrieved-1": rows})  # type: ignore[arg-type]
    out = summarize_set(s)
    assert out["agreeing"]["IRCAN"]["k"] == 19 and out["agreeing"]["mcnemar"]["a_only"] == 1
    assert out["locality"] == {} and out["settings"]["retrieved-1"]["methods"]["IRCAN"]["goal"]["k"] == 20


def test_instruction_goes_before_the_context_in_the_user_text():
    from ircan_serve.prompts import INSTRUCTION, PromptTemplate, instructed

    t = PromptTemplate(with_context="{context}\n{question}", without_context="{question}", chat=True)
    assert instructed(t).render("Q", "C") == f"{INSTRUCTION}\nC\nQ"
    assert instructed(t).render("Q") == "Q" and instructed(t).chat


def test_demo_settings_build_every_context_from_the_held_out_rows():
    from pathlib import Path

    from ircan_serve.demo import DemoSet, build_settings, demo_setting
    from ircan_serve.errors import IrcanError
    from ircan_serve.prompts import QA_TEMPLATE

    recipe = Path(__file__).resolve().parents[1] / "export" / "smollm2-conflicts.toml"
    rows, held = held_out_questions(recipe)
    s = DemoSet("conflicts", None, QA_TEMPLATE, rows, held[:6])  # type: ignore[arg-type]
    build_settings(s, ["retrieved-1", "retrieved-4", "passage-list", "passage-bullets", "irrelevant"])
    one, four = s.settings["retrieved-1"], s.settings["retrieved-4"]
    assert s.rows is one and all(len(v) == 6 for v in s.settings.values())
    # a wider retrieval finds the own document at least as often, and holds more text
    assert sum(bool(r.own_document) for r in four) >= sum(bool(r.own_document) for r in one)
    assert all(len(b.context) > len(a.context) for a, b in zip(one, four))
    for r in s.settings["passage-list"]:
        assert r.context.startswith("1. ") and answer_matches(r.context, r.example.answer)
    for r in s.settings["passage-bullets"]:
        assert r.context.startswith("Key facts about ") and "\n- " in r.context
        assert answer_matches(r.context, r.example.answer)
    for r in s.settings["irrelevant"]:
        assert (r.example.context or "") not in r.context and r.own_document is None
    import pytest

    with pytest.raises(IrcanError, match="demo setting 'top-9' does not exist; settings: retrieved-1"):
        demo_setting("top-9")


def test_demo_served_end_to_end_with_every_method(patched_smollm2):
    """Both servers, every method (CAD on the first question), two settings, on three held-out rows."""
    from pathlib import Path

    from ircan_serve.demo import METHODS, print_demo, run_demo

    recipe = Path(__file__).resolve().parents[1] / "export" / "smollm2-conflicts.toml"
    saved: list[set[str]] = []  # the methods answered at each save: one save per finished method
    sets = run_demo([(patched_smollm2, recipe)], limit=3, settings=["retrieved-1", "passage-list", "chat-retrieved-4"],
                    cad_alpha=0.5, cad_limit=1, cad_settings=["retrieved-1", "chat-retrieved-4"], concurrency=4,
                    save=lambda partial: saved.append(set(partial[0].settings["retrieved-1"][0].answers)))
    assert saved[0] == {"original"} and saved[-1] == set(METHODS) and len(saved) == len(METHODS)
    (s,) = sets
    plain = {"original", "instruction", "IRCAN", "IRCAN+instruction"}
    for name, rows in s.settings.items():
        assert len(rows) == 3
        assert all(set(r.answers) >= plain for r in rows)
        assert set(rows[0].answers) == (plain if name == "passage-list" else set(METHODS))  # CAD: two settings
        assert "CAD" not in rows[1].answers  # CAD on the first question only
    (summary,) = print_demo(sets)
    table = summary["settings"]["retrieved-1"]["methods"]
    assert table["CAD"]["goal"]["n"] == 1 and table["IRCAN"]["goal"]["n"] == 3
    assert "CAD" not in summary["settings"]["passage-list"]["methods"]
    assert summary["settings"]["retrieved-1"]["own_document"]["n"] == 3


def test_demo_refuses_cad_settings_it_does_not_ask(capsys):
    """``--cad-settings`` names settings of ``--setting``; any other ends before a server starts."""
    from ircan_serve.cli import main

    assert main(["demo", "--setting", "retrieved-1", "passage-list", "--cad-settings", "irrelevant"]) == 2
    assert "--cad-settings irrelevant: each must be one of --setting (retrieved-1 passage-list)" in capsys.readouterr().err


def test_demo_help_names_every_setting(capsys, monkeypatch):
    """The --setting help lists every setting of the table (the parser imports no torch)."""
    import pytest

    from ircan_serve.cli import main
    from ircan_serve.demo.run import SETTINGS

    monkeypatch.setenv("COLUMNS", "2000")
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert [name for name in SETTINGS if name not in out] == []
