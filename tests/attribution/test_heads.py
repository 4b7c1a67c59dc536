"""Attention heads as a second unit kind: attributed like neurons, selected, exported and verified."""

import json

import pytest
import torch

from helpers import FAMILIES, token_ids
from ircan_serve.attribution import AttributionStore, ContextAwareIntegratedGradients, attribute_examples
from ircan_serve.checkpoint.export import export_checkpoint
from ircan_serve.checkpoint.verify import verify_checkpoint
from ircan_serve.config import AttributionConfig, SelectionConfig
from ircan_serve.errors import IrcanError
from ircan_serve.models import load_model
from ircan_serve.reweight import reweighted
from ircan_serve.selection import select_units
from ircan_serve.units import Unit, UnitSet, projections, units_per_layer


@pytest.mark.parametrize("family", FAMILIES)
def test_head_scores_fast_equal_reference(family, tiny_model_dirs, conflicts):
    """The attention output projection's input, integrated like the FFN's: the fast path (which
    runs each patched layer's FFN after the patch) equals the reference; a head's score is the sum
    of its head_dim features'."""
    lm = load_model(str(tiny_model_dirs[family]))
    ig = ContextAwareIntegratedGradients(lm.model, lm.tokenizer)
    fast = ig.attribute(conflicts[0], AttributionConfig(n_steps=4), kind="head")
    ref = ig.attribute(conflicts[0], AttributionConfig(n_steps=4, method="reference"), kind="head")
    scale = ref.scores.abs().max().item()
    assert scale > 0 and fast.kind == "head" and fast.width == 64
    torch.testing.assert_close(fast.scores, ref.scores, rtol=1e-5, atol=1e-5 * scale)
    assert fast.unit_scores().shape == (2, units_per_layer(lm.model, "head")) == (2, 2)
    torch.testing.assert_close(fast.unit_scores()[:, 1], fast.scores[:, 64:128].sum(-1))


def test_a_heads_effect_predicts_scaling_it(tiny_llama, conflicts):
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    ex = conflicts[5]
    result = ContextAwareIntegratedGradients(model, tok).attribute(ex, AttributionConfig(n_steps=20), kind="head")
    ids = token_ids(tok, ex.prompt)

    def prob() -> float:
        with torch.no_grad():
            return torch.softmax(model(ids).logits[0, -1], -1)[result.answer_token].item()

    effects = result.unit_effects()
    p0 = prob()
    for layer in range(2):
        for index in range(2):
            units = UnitSet(neurons=[Unit(kind="head", layer=layer, index=index, scale=1.05)],
                            selection=SelectionConfig(), n_examples=1)
            with reweighted(model, units):
                change = prob() - p0
            if abs(effects[layer, index]) > 1e-4:
                assert change * effects[layer, index].item() > 0, (layer, index)


def test_both_kinds_are_stored_selected_exported_and_verified(tmp_path, tiny_llama_dir, conflicts):
    lm = load_model(str(tiny_llama_dir))
    store = AttributionStore(tmp_path / "store")
    config = AttributionConfig(n_steps=3, units=["neuron", "head"])
    records = attribute_examples(lm.model, lm.tokenizer, conflicts[:4], config, store=store,
                                 header={"model": "tiny"}, progress=False)
    assert [r.kind for r in records[:2]] == ["neuron", "head"] and len(records) == 8
    assert len(store.all("head")) == 4 and len(store.all("neuron")) == 4
    # what tuning, fitting and eval read: every kind the store holds (a head-less read made --g a no-op)
    assert [r.kind for r in store.all()] == ["neuron"] * 4 + ["head"] * 4
    assert select_units(store.all(), SelectionConfig(num_neurons=1, num_heads=1)).count("head") == 1
    again = attribute_examples(lm.model, lm.tokenizer, conflicts[:4], config, store=AttributionStore(tmp_path / "store"),
                               header={"model": "tiny"}, progress=False)
    assert all(torch.equal(a.scores, b.scores) for a, b in zip(records, again))  # read back, both kinds
    units = select_units(records, SelectionConfig(num_neurons=2, num_heads=1)).scaled(3.0, "signed")
    assert [u.kind for u in units.neurons] == ["neuron", "neuron", "head"]
    out = tmp_path / "ckpt"
    export_checkpoint(str(tiny_llama_dir), units, None, out)
    report = verify_checkpoint(out, base=str(tiny_llama_dir))
    assert report.ok and report.columns_checked == 2 + 64  # two neuron columns, one head's 64
    patched = load_model(str(out))
    ids = token_ids(lm.tokenizer, conflicts[0].prompt)
    with torch.no_grad():
        with reweighted(lm.model, units):
            expected = lm.model(ids).logits
        torch.testing.assert_close(patched.model(ids).logits, expected, rtol=0, atol=0)
    head = units.neurons[-1]
    o_proj = projections(patched.model, "head")[head.layer].weight
    base = projections(lm.model, "head")[head.layer].weight
    changed = (o_proj != base).any(dim=0).nonzero().flatten().tolist()
    assert changed == list(range(head.index * 64, head.index * 64 + 64))


def test_bad_units_name_the_file_and_the_problem(tmp_path, tiny_llama_dir, monkeypatch):
    from ircan_serve import architectures

    bad = UnitSet(neurons=[Unit(kind="head", layer=1, index=7, scale=2.0)], selection=SelectionConfig(), n_examples=1)
    with pytest.raises(IrcanError, match="head h1:7 is out of range: the model has 2 heads per layer"):
        export_checkpoint(str(tiny_llama_dir), bad, None, tmp_path / "x")
    row = architectures.ARCHITECTURES["llama"]
    monkeypatch.setitem(architectures.ARCHITECTURES, "llama", type(row)(row.layers, row.ffn_out, row.neuron_axis))
    lm = load_model(str(tiny_llama_dir))
    with pytest.raises(IrcanError, match="llama models have no head units in the architecture table.*attn_out"):
        projections(lm.model, "head")
    # from a recipe: the error names the recipe file, before any attribution work
    from ircan_serve.config import load_recipe
    from ircan_serve.pipeline import run_recipe

    recipe = tmp_path / "heads.toml"
    recipe.write_text(f'model = "{tiny_llama_dir}"\ndata = "conflicts"\nlimit = 2\n[attribution]\nunits = ["neuron", "head"]\n')
    with pytest.raises(IrcanError, match=r"heads\.toml: \[attribution\] units: llama models have no head units"):
        run_recipe(load_recipe(recipe), out_root=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_neuron_files_from_before_heads_still_load(tmp_path):
    old = {"neurons": [{"layer": 3, "index": 5, "count": 2, "mean_score": 0.1, "effect": 0.2, "scale": 2.0}],
           "selection": {"threshold": 0.1, "top_z": 20, "num_neurons": 1}, "n_examples": 4, "beta": 2.0}
    (tmp_path / "neurons.json").write_text(json.dumps(old))
    units = UnitSet.load(tmp_path / "neurons.json")
    assert units.neurons[0].kind == "neuron" and units.neurons[0].label == "3:5"
