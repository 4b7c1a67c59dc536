import dataclasses

import torch

from ircan_serve.config import SelectionConfig, load_recipe, write_recipe_choice
from ircan_serve.evaluation.metrics import agreement, first_token_score, logit_score
from ircan_serve.evaluation.tuning import tune
from ircan_serve.generation import next_token_logits
from ircan_serve.reweight import reweighted
from ircan_serve.units import Unit, UnitSet


def test_left_padded_batch_equals_one_by_one(tiny_llama, conflicts):
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    prompts = [e.prompt for e in conflicts[:5]] + ["Question: x?\nAnswer:"]
    batched = next_token_logits(model, tok, prompts, batch_size=6)
    for i, p in enumerate(prompts):
        single = model(torch.tensor([tok(p)["input_ids"]])).logits[0, -1]
        torch.testing.assert_close(batched[i], single, rtol=1e-4, atol=1e-4)


def test_first_token_score_counts_answers(tiny_llama, conflicts):
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    s = first_token_score(model, tok, conflicts[:8])
    assert s.n == 8 and 0 <= s.accuracy <= 1 and s.accuracy + s.stubbornness <= 1
    # forcing the memorized answer as "the context's answer" swaps the two rates
    swapped = [e.model_copy(update={"answer": e.memorized, "memorized": e.answer}) for e in conflicts[:8]]
    t = first_token_score(model, tok, swapped)
    assert (t.accuracy, t.stubbornness) == (s.stubbornness, s.accuracy)


def test_agreement_with_itself_is_perfect(tiny_llama, conflicts):
    prompts = [e.prompt_without_context for e in conflicts[:4]]
    ref = next_token_logits(tiny_llama.model, tiny_llama.tokenizer, prompts)
    agree, kl = agreement(tiny_llama.model, tiny_llama.tokenizer, prompts, ref)
    assert agree == 1.0 and abs(kl) < 1e-6


def test_tune_grid_choice_and_restored_weights(tiny_llama, conflicts):
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    neurons = UnitSet(neurons=[Unit(layer=1, index=i, effect=(-1) ** i) for i in range(4)],
                        selection=SelectionConfig(num_neurons=4), n_examples=1)
    result = tune(model, tok, neurons, conflicts[:6], hs=[1, 2, 9], betas=[0.0, 2.0, 500.0],
                  min_agreement=0.5, max_drop=1.0, progress=False)
    # signed takes only beta > 1; beta = 1 would be the original
    assert [(p.rule, p.h, p.beta) for p in result.grid] == (
        [("paper", h, b) for h in (1, 2) for b in (0.0, 2.0, 500.0)]
        + [("signed", h, b) for h in (1, 2) for b in (2.0, 500.0)])
    assert result.best is not None and not result.best.collapsed and result.best.beta > 1
    assert all(result.best.dev.accuracy >= p.dev.accuracy for p in result.grid if not p.collapsed and p.beta > 1)
    assert result.best_shrink is None or result.best_shrink.beta < 1
    for p in result.grid:
        assert p.collapsed == (p.agreement < 0.5)
    # the shipped rows carry agreeing contexts, so the side check is measured at every point
    assert result.original_checks.agreeing is not None
    assert all((p.checks.agreeing is not None) == (p.agreement >= 0.5) for p in result.grid)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_choice_written_into_recipe_keeps_comments(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('# my recipe\nmodel = "smollm2"\nbeta = 5.0\n\n[selection]\n# h\nnum_neurons = 9\n')
    write_recipe_choice(recipe, 3, 1.5)
    text = recipe.read_text()
    assert "# my recipe" in text and "# h" in text
    r = load_recipe(recipe)
    assert r.beta == 1.5 and r.selection.num_neurons == 3
    bare = tmp_path / "b.toml"
    bare.write_text('model = "smollm2"\n[attribution]\nn_steps = 4\n')
    write_recipe_choice(bare, 2, 0.5)
    r = load_recipe(bare)
    assert (r.beta, r.selection.num_neurons, r.attribution.n_steps) == (0.5, 2, 4)


def test_side_check_drop_collapses_a_point(tiny_llama, conflicts):
    from ircan_serve.evaluation.tuning import SideChecks, collapse_reason

    base = SideChecks(locality=0.9, agreeing=0.8)
    assert collapse_reason(0.95, SideChecks(locality=0.89, agreeing=0.8), base, 0.8, 0.02) == ""
    assert "locality" in collapse_reason(0.95, SideChecks(locality=0.85, agreeing=0.8), base, 0.8, 0.02)
    assert "agreeing" in collapse_reason(0.95, SideChecks(locality=0.9, agreeing=0.7), base, 0.8, 0.02)
    assert "agreement" in collapse_reason(0.5, base, base, 0.8, 0.02)
    kept = SideChecks(irrelevant=0.7)
    assert collapse_reason(0.95, SideChecks(irrelevant=0.69), kept, 0.8, 0.02) == ""
    assert "irrelevant -0.100" in collapse_reason(0.95, SideChecks(irrelevant=0.6), kept, 0.8, 0.02)


def test_irrelevant_check_is_held_over_all_dev_rows_and_collapses_a_point_that_drops_the_answer(tiny_llama, conflicts):
    """Rows in two formats, with other rows' contexts before their question, whose memorized answer
    is what the original says there: the check is measured once over all rows (its prompt does not
    depend on the format); a patch that changes those answers is collapsed, the identity is not."""
    from ircan_serve.answers import answer_token_id
    from ircan_serve.evaluation.tuning import Baseline, score_point

    model, tok = tiny_llama.model, tiny_llama.tokenizer
    rows = []
    for i, e in enumerate(conflicts[:12]):
        prompt = f"{conflicts[(i + 1) % 12].context}\n{e.prompt_without_context}"
        top = int(next_token_logits(model, tok, [prompt])[0].argmax())
        said = tok.decode([top])
        if said.strip() and answer_token_id(tok, prompt, said) == top:  # the answer the original gives there
            rows.append(e.model_copy(update={"id": f"{e.id}@topk" if i % 2 else e.id, "irrelevant_prompt": prompt,
                                             "memorized": said, "agreeing_prompt": None, "locality_prompt": None}))
    assert len(rows) >= 6 and len({r.id.endswith("@topk") for r in rows}) == 2
    base = Baseline.measure(model, tok, rows)
    assert base.overall.irrelevant == 1.0 and all(c.irrelevant is None for c in base.checks.values())
    units = [Unit(layer=layer, index=i) for layer in (0, 1) for i in range(8)]
    for scale, dropped in ((1.0, False), (500.0, True)):
        patch = UnitSet(neurons=[u.model_copy(update={"scale": scale}) for u in units],
                        selection=SelectionConfig(num_neurons=16), n_examples=1)
        point = score_point(model, tok, rows, base, patch, ("paper", 16, 0, scale), 0.0, 0.0)
        assert (point.checks.irrelevant < 1.0) == dropped, point
        assert point.collapsed == dropped and ("irrelevant -" in point.reason) == dropped, point.reason
    # one row of six in one format loses its answer: 1/12 over all rows is within a drop of 0.1,
    # where 1/6 in that format alone would not be
    lost = next(i for i, r in enumerate(rows) if r.id.endswith("@topk"))
    fewer = [r.model_copy(update={"memorized": "zzzz"}) if i == lost else r for i, r in enumerate(rows)]
    identity = UnitSet(neurons=[units[0].model_copy(update={"scale": 1.0})], selection=SelectionConfig(num_neurons=1),
                       n_examples=1)
    point = score_point(model, tok, fewer, dataclasses.replace(base, overall_rows=fewer), identity,
                        ("paper", 1, 0, 1.0), 0.0, 1.5 / len(rows))
    assert point.checks.irrelevant == 1 - 1 / len(rows) and not point.collapsed, point.reason


def test_checks_held_over_all_rows_take_the_rows_given_beside_the_dev_rows(tiny_llama, conflicts):
    """``overall_rows``: the irrelevant check is measured on those rows (a recipe passes its
    attribution rows too), not on the dev rows, which here have no irrelevant prompt at all."""
    from ircan_serve.evaluation.recipe_runs import overall_rows
    from ircan_serve.evaluation.tuning import Baseline, score_point
    from ircan_serve.pipeline import RecipeData

    model, tok = tiny_llama.model, tiny_llama.tokenizer
    rows = []
    for i, e in enumerate(conflicts[:12]):
        prompt = f"{conflicts[(i + 1) % 12].context}\n{e.prompt_without_context}"
        said = tok.decode([int(next_token_logits(model, tok, [prompt])[0].argmax())])
        rows.append(e.model_copy(update={"irrelevant_prompt": prompt, "memorized": said}))
    dev = [e.model_copy(update={"irrelevant_prompt": None}) for e in conflicts[12:18]]
    assert Baseline.measure(model, tok, dev).overall.irrelevant is None
    base = Baseline.measure(model, tok, dev, overall_rows=rows)
    assert base.overall_rows == rows and base.overall.irrelevant is not None and base.overall.irrelevant > 0.5
    units = [Unit(layer=layer, index=i, scale=500.0) for layer in (0, 1) for i in range(8)]
    patch = UnitSet(neurons=units, selection=SelectionConfig(num_neurons=16), n_examples=1)
    point = score_point(model, tok, dev, base, patch, ("paper", 16, 0, 500.0), 0.0, 0.0)
    assert point.collapsed and "irrelevant -" in point.reason, point.reason
    # a recipe's rows: every row that is not a test row; without [splits] the dev rows are all
    split = RecipeData(rows[:6], rows[6:], conflicts[20:22], [], None, corpus=rows)
    assert overall_rows(split) == rows
    paper = RecipeData(rows, rows, [], [], None, corpus=rows)
    assert overall_rows(paper) == rows


def test_every_side_check_has_a_place_in_the_results():
    from ircan_serve.evaluation.metrics import SIDE_CHECKS
    from ircan_serve.evaluation.runner import MethodResult
    from ircan_serve.evaluation.tuning import SideChecks

    assert set(SIDE_CHECKS) <= set(SideChecks.model_fields) & set(MethodResult.model_fields)


def test_last_position_logits_equal_all_positions(tiny_llama, conflicts):
    prompts = [e.prompt for e in conflicts[:6]]
    fast = next_token_logits(tiny_llama.model, tiny_llama.tokenizer, prompts, batch_size=4)
    full = next_token_logits(tiny_llama.model, tiny_llama.tokenizer, prompts, batch_size=4, all_positions=True)
    torch.testing.assert_close(fast, full)


def test_rule_written_into_recipe(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "smollm2"\n[selection]\nnum_neurons = 9\n')
    write_recipe_choice(recipe, 3, 2.0, "signed")
    assert load_recipe(recipe).selection.rule == "signed"
    write_recipe_choice(recipe, 3, 2.0, "paper")
    assert load_recipe(recipe).selection.rule == "paper"


def test_fit_factors_gains_rows_under_the_checks_and_restores_weights(tiny_llama, conflicts):
    from ircan_serve.evaluation.fitting import fit_factors

    model, tok = tiny_llama.model, tiny_llama.tokenizer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pool = UnitSet(neurons=[Unit(layer=layer, index=i) for layer in (0, 1) for i in range(3)],
                   selection=SelectionConfig(num_neurons=6), n_examples=1)
    dev = conflicts[:8]
    result = fit_factors(model, tok, pool, dev, factors=(0.0, 20.0, 200.0), max_units=3,
                         min_agreement=0.0, max_drop=1.0)
    accuracies = [result.original.accuracy] + [s.point.dev.accuracy for s in result.steps]
    assert result.original_by_format == {"sentence": result.original.accuracy}  # rows as loaded: one format
    # every kept unit gains at least one dev row, and passes the checks
    assert all(b >= a + 1 / len(dev) - 1e-9 for a, b in zip(accuracies, accuracies[1:]))
    assert all(not s.point.collapsed for s in result.steps)
    assert [u.label for u in result.units.neurons] == [s.unit.label for s in result.steps]
    assert len({u.label for u in result.units.neurons}) == len(result.units.neurons) <= 3
    assert all(u.scale in (0.0, 20.0, 200.0) for u in result.units.neurons)
    assert result.units.rule == "fitted"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fit_with_an_agreement_floor_of_one_keeps_no_unit_that_moves_the_model(tiny_llama, conflicts):
    from ircan_serve.evaluation.fitting import fit_factors

    pool = UnitSet(neurons=[Unit(layer=1, index=i) for i in range(3)], selection=SelectionConfig(num_neurons=3),
                   n_examples=1)
    result = fit_factors(tiny_llama.model, tiny_llama.tokenizer, pool, conflicts[:8], factors=(500.0,),
                         max_units=2, min_agreement=1.0, max_drop=0.0)
    assert all(s.point.agreement == 1.0 for s in result.steps)


def test_fitted_units_live_in_the_recipe(tmp_path):
    import pytest

    from ircan_serve.errors import IrcanError
    from ircan_serve.pipeline import recipe_units

    recipe = tmp_path / "r.toml"
    recipe.write_text('# fitted\nmodel = "smollm2"\nbeta = 5.0\n[selection]\nnum_neurons = 9\n')
    units = [Unit(layer=19, index=201, scale=5.0), Unit(kind="head", layer=12, index=3, scale=0.0)]
    write_recipe_choice(recipe, 1, 5.0, g=1, fitted=[u.written for u in units])
    r = load_recipe(recipe)
    assert r.fitted == ["19:201x5", "h12:3x0"] and "# fitted" in recipe.read_text()
    got = recipe_units(r, [])
    assert [(u.kind, u.layer, u.index, u.scale) for u in got.neurons] == [
        ("neuron", 19, 201, 5.0), ("head", 12, 3, 0.0)]
    assert got.rule == "fitted"
    # a grid choice replaces the fit
    write_recipe_choice(recipe, 2, 3.0, "signed")
    assert load_recipe(recipe).fitted == []
    # a bad unit names the recipe file and the fix
    recipe.write_text('model = "smollm2"\nfitted = ["19-201 x5"]\n')
    with pytest.raises(IrcanError, match=r"r\.toml: fitted: unit '19-201 x5' is not LAYER:INDEXxFACTOR"):
        recipe_units(load_recipe(recipe), [])


def test_length_sorted_batches_come_back_in_the_callers_order(tiny_llama, conflicts):
    from ircan_serve.generation import greedy_generate

    model, tok = tiny_llama.model, tiny_llama.tokenizer
    prompts = ["Question: x?\nAnswer:", conflicts[0].prompt * 3, conflicts[1].prompt, "Hi", conflicts[2].prompt * 2]
    batched = next_token_logits(model, tok, prompts, batch_size=2)
    for i, p in enumerate(prompts):
        single = model(torch.tensor([tok(p)["input_ids"]])).logits[0, -1]
        torch.testing.assert_close(batched[i], single, rtol=1e-4, atol=1e-4)
    assert greedy_generate(model, tok, prompts, 4, batch_size=2) == [greedy_generate(model, tok, [p], 4)[0]
                                                                      for p in prompts]


def test_fit_moves_add_change_and_drop_only_from_a_start():
    from ircan_serve.evaluation.fitting import _moves

    chosen = [Unit(layer=0, index=1, scale=2.0)]
    pool = [Unit(layer=0, index=1), Unit(kind="head", layer=1, index=0)]
    plain = _moves(chosen, pool, (0.5, 2.0), adjust=False)
    # a chosen unit is not added twice; without adjust nothing chosen moves
    assert [(m, u.label, u.scale) for _, u, m in plain] == [("add", "h1:0", 0.5), ("add", "h1:0", 2.0)]
    assert all(units[0] == chosen[0] and len(units) == 2 for units, _, _ in plain)
    moved = _moves(chosen, pool, (0.5, 2.0), adjust=True)
    changes = [(units, u) for units, u, m in moved if m == "change"]
    # the chosen unit at every other factor (not its own), in its place; and dropped
    assert [(len(units), units[0].scale, u.scale) for units, u in changes] == [(1, 0.5, 0.5)]
    assert [units for units, _, m in moved if m == "drop"] == [[]]


def test_fit_ranks_by_accuracy_or_by_rows_per_agreement_spent():
    from ircan_serve.evaluation.fit_ranks import Try
    from ircan_serve.evaluation.fitting import _ranked

    unit = Unit(layer=0, index=0, scale=2.0)
    tries = [Try(0.60, 0.90, [unit], unit, "add"),   # +10 rows, spends 0.08 of agreement
             Try(0.52, 0.98, [unit], unit, "add"),   # +2 rows, spends nothing
             Try(0.70, 0.80, [unit], unit, "add"),   # below the agreement floor: never ranked
             Try(0.505, 0.99, [unit], unit, "add")]  # gains half a row: never ranked
    by_accuracy = _ranked(tries, best=0.50, agree_now=0.98, n_rows=100, min_agreement=0.85, rank="accuracy")
    assert [t.accuracy for t in by_accuracy] == [0.60, 0.52]
    by_efficiency = _ranked(tries, best=0.50, agree_now=0.98, n_rows=100, min_agreement=0.85, rank="efficiency")
    assert [t.accuracy for t in by_efficiency] == [0.52, 0.60]


def test_fit_from_a_start_moves_a_chosen_units_factor(tiny_llama, conflicts):
    from ircan_serve.evaluation.fitting import fit_factors

    model, tok = tiny_llama.model, tiny_llama.tokenizer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pool = UnitSet(neurons=[Unit(layer=layer, index=i) for layer in (0, 1) for i in range(3)],
                   selection=SelectionConfig(num_neurons=6), n_examples=1)
    # dev rows whose "context answer" is what the model predicts with neuron 1:2 x 200 (the
    # "memorized" one what it predicts as is): a fit started from 1:2 erased must move its factor
    target = Unit(layer=1, index=2, scale=200.0)
    rows = conflicts[:8]
    original = next_token_logits(model, tok, [e.prompt for e in rows]).argmax(-1)
    with reweighted(model, pool.model_copy(update={"neurons": [target], "rule": "fitted"})):
        patched = next_token_logits(model, tok, [e.prompt for e in rows]).argmax(-1)
    dev = [e.model_copy(update={"answer": tok.decode([int(b)]), "memorized": tok.decode([int(a)])})
           for e, a, b in zip(rows, original, patched) if a != b]
    assert len(dev) >= 4
    start = [target.model_copy(update={"scale": 0.0})]
    result = fit_factors(model, tok, pool, dev, factors=(0.0, 20.0, 200.0), max_units=1, min_agreement=0.0,
                         max_drop=1.0, start=start, rank="efficiency")
    first = result.steps[0]
    assert first.move == "start" and first.tried == 0 and first.unit.written == "1:2x0"
    with reweighted(model, pool.model_copy(update={"neurons": start, "rule": "fitted"})):
        assert first.point.dev.accuracy == logit_score(model, tok, dev).accuracy
    # max_units 1: nothing is added; the erased unit's factor moves to the one the rows were made with
    assert [(s.move, s.unit.written) for s in result.steps[1:]] == [("change", "1:2x200")]
    assert [u.written for u in result.units.neurons] == ["1:2x200"]
    assert [s.units for s in result.steps] == [["1:2x0"], ["1:2x200"]]
    # (all rows but a byte token's, whose text does not decode back to itself)
    assert result.steps[-1].point.dev.accuracy >= 1 - 1.5 / len(dev) > first.point.dev.accuracy
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fit_refuses_a_start_that_fails_the_checks(tiny_llama, conflicts):
    import pytest

    from ircan_serve.errors import IrcanError
    from ircan_serve.evaluation.fitting import fit_factors

    pool = UnitSet(neurons=[Unit(layer=1, index=i) for i in range(3)], selection=SelectionConfig(num_neurons=3),
                   n_examples=1)
    start = [Unit(layer=1, index=i, scale=500.0) for i in range(3)]
    with pytest.raises(IrcanError, match=r"starting units \(1:0x500, .*\) fail the checks: .*agreement"):
        fit_factors(tiny_llama.model, tiny_llama.tokenizer, pool, conflicts[:8], factors=(2.0,), max_units=3,
                    min_agreement=1.0, max_drop=0.0, start=start)
