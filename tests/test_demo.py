from ircan_serve.demo import held_out_questions
from ircan_serve.evaluation.metrics import answer_matches


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
