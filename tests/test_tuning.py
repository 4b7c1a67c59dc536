import torch

from ircan_serve.config import SelectionConfig, load_recipe
from ircan_serve.evaluation.metrics import agreement, first_token_score, next_token_logits
from ircan_serve.evaluation.tuning import tune, write_choice_to_recipe
from ircan_serve.selection import Neuron, NeuronSet


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
    neurons = NeuronSet(neurons=[Neuron(layer=1, index=i) for i in range(4)],
                        selection=SelectionConfig(num_neurons=4), n_examples=1)
    result = tune(model, tok, neurons, conflicts[:6], hs=[1, 2, 9], betas=[0.0, 2.0, 500.0],
                  min_agreement=0.5, progress=False)
    assert [(p.h, p.beta) for p in result.grid] == [(h, b) for h in (1, 2) for b in (0.0, 2.0, 500.0)]
    assert result.best is not None and not result.best.collapsed
    assert all(result.best.dev.accuracy >= p.dev.accuracy for p in result.grid if not p.collapsed)
    for p in result.grid:
        assert p.collapsed == (p.agreement < 0.5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_choice_written_into_recipe_keeps_comments(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('# my recipe\nmodel = "smollm2"\nbeta = 5.0\n\n[selection]\n# h\nnum_neurons = 9\n')
    write_choice_to_recipe(recipe, 3, 1.5)
    text = recipe.read_text()
    assert "# my recipe" in text and "# h" in text
    r = load_recipe(recipe)
    assert r.beta == 1.5 and r.selection.num_neurons == 3
    bare = tmp_path / "b.toml"
    bare.write_text('model = "smollm2"\n[attribution]\nn_steps = 4\n')
    write_choice_to_recipe(bare, 2, 0.5)
    r = load_recipe(bare)
    assert (r.beta, r.selection.num_neurons, r.attribution.n_steps) == (0.5, 2, 4)
