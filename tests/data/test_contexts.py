"""Context formats built from the same rows: passages, top-k documents, irrelevant documents, mixes."""

import re

import pytest

from helpers import FIXTURES
from ircan_serve.answers import answer_matches
from ircan_serve.data import load_examples
from ircan_serve.data.contexts import CONTEXTS, SHEET, SUPPORT, ContextPool, format_of, in_context, mixed
from ircan_serve.errors import IrcanError
from ircan_serve.prompts import COMPLETION_TEMPLATE


def _render(question, context=None):
    return COMPLETION_TEMPLATE.render(question, context)


@pytest.fixture(scope="module")
def rows():
    return load_examples(FIXTURES / "data" / "counterfact-val-head.json", skip_invalid=True).examples[:40]


@pytest.mark.parametrize("name", ["passage-prose", "passage-list", "passage-qa", "passage-bullets"])
def test_passages_state_the_answer_inside_several_claims_among_distractors(rows, name):
    pool = ContextPool(rows)
    for e in rows[:10]:
        built = in_context(e, name, pool, _render)
        text = built.context
        answer = e.answer.strip()
        assert built.id == f"{e.id}@{name}" and format_of(built) == name
        assert text.count(answer) >= 2, text  # several supporting claims
        assert not text.rstrip(". \n").endswith(answer), text  # the answer is not the last word
        assert e.question not in text  # the question itself is never copied into the evidence
        assert any(o.context in text for o in rows if o.id != e.id), text  # a claim about another subject
        assert 50 <= len(text.split()) <= 130
        assert built.prompt == _render(e.question, text)
        assert answer_matches(built.agreeing_context, e.memorized) and not answer_matches(built.agreeing_context, answer)
        assert in_context(e, name, pool, _render) == built  # seeded: the same rows give the same passages


def test_top_k_holds_the_rows_own_document_and_irrelevant_never_does(rows):
    pool = ContextPool(rows, k=3)
    e = rows[7]
    top = in_context(e, "topk", pool, _render)
    assert e.context in top.context and top.context.count(".") >= 3
    irrelevant = in_context(e, "irrelevant", pool, _render)
    assert e.context not in irrelevant.context and irrelevant.agreeing_prompt is None
    assert len(pool.nearest(e, 3, exclude_own=True)) == 3
    # another row about the same subject (here: the same fact again) is not an irrelevant document either
    twin = e.model_copy(update={"id": "twin"})
    near = ContextPool([*rows, twin], k=3)
    assert twin in near.nearest(e, 3, exclude_own=False)
    others = near.nearest(e, 3, exclude_own=True)
    assert len(others) == 3 and all(r.subject != e.subject for r in others)


def test_a_mix_takes_the_formats_in_turn_and_the_table_names_itself(rows):
    pool = ContextPool(rows)
    mix = mixed(rows[:6], ["sentence", "passage-qa"], pool, _render)
    assert [format_of(e) for e in mix] == ["sentence", "passage-qa"] * 3
    # every row, in any format, carries the irrelevant side check: its question after other subjects' documents
    assert mix[0].model_copy(update={"irrelevant_prompt": None}) == rows[0]  # otherwise a sentence row is as loaded
    for e, built in zip(rows[:6], mix):
        assert built.irrelevant_prompt == _render(e.question, in_context(e, "irrelevant", pool, _render).context)
        assert e.context not in built.irrelevant_prompt and built.irrelevant_prompt.endswith(_render(e.question))
    with pytest.raises(IrcanError, match="context format 'essay' does not exist.*CONTEXTS"):
        mixed(rows[:2], ["essay"], pool, _render)
    assert set(CONTEXTS) >= {"sentence", "passage-prose", "passage-list", "passage-qa", "passage-bullets", "topk",
                             "irrelevant"}


def test_the_fact_sheet_words_its_claims_apart_from_the_numbered_list(rows):
    """Tuned on ``passage-list``, reported on ``passage-bullets``: the two share no claim sentence
    (the sheet's templates are another bank), so a gain there is not the list's wording learned."""
    pool = ContextPool(rows)
    for e in rows[:10]:
        listed = in_context(e, "passage-list", pool, _render).context.splitlines()
        sheet = in_context(e, "passage-bullets", pool, _render).context.splitlines()
        claims = {line.partition(". ")[2] for line in listed if e.answer.strip() in line} - {o.context for o in rows}
        assert sheet[0] == f"Key facts about {e.subject}:" and all(line.startswith("- ") for line in sheet[1:])
        assert len(sheet) == 7 and not claims & {line[2:] for line in sheet[1:]}
    # no template of the sheet shares three words in a row with a template of the list (slots aside)
    def runs(template):
        words = re.sub(r"\{\w+\}|[,;:.]", " ", template).lower().split()
        return {tuple(words[i:i + 3]) for i in range(len(words) - 2)}

    assert not set().union(*map(runs, SHEET)) & set().union(*map(runs, SUPPORT))
