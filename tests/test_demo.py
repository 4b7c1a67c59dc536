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


def test_demo_summary_has_intervals_and_the_paired_test():
    from ircan_serve.data import load_examples
    from ircan_serve.demo import DemoRow, DemoSet, summarize_set

    ex = load_examples("conflicts").examples[0]  # answer Lyon, memorized Paris
    rows = []
    for i in range(20):  # the patched model follows on 12 more rows than the original, loses none
        orig = "Lyon" if i < 5 else "Paris"
        rows.append(DemoRow(ex, ex.context or "", {"original": orig, "IRCAN": "Lyon" if i < 17 else "Paris"},
                            agreeing={"original": "Paris", "IRCAN": "Paris" if i else "Lyon"}))
    s = DemoSet("t", None, None, [ex], [ex] * 20, rows)  # type: ignore[arg-type]
    out = summarize_set(s)
    f = out["follows"]
    assert (f["original"]["k"], f["IRCAN"]["k"]) == (5, 17)
    lo, hi = f["IRCAN"]["ci"]
    assert lo < 17 / 20 < hi
    assert f["mcnemar"]["b_only"] == 12 and f["mcnemar"]["p_value"] < 0.001
    assert out["agreeing"]["IRCAN"]["k"] == 19 and out["locality"] == {}
