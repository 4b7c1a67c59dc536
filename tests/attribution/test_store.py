"""The attribution store: resume after a kill, settings that must match, old versions, bad files."""

import json

import pytest
import torch

from ircan_serve.attribution import AttributionStore, ContextAwareIntegratedGradients, attribute_examples
from ircan_serve.config import AttributionConfig, SelectionConfig
from ircan_serve.errors import IrcanError
from ircan_serve.selection import select_units


def test_killed_run_resumes_without_recomputing(tmp_path, tiny_llama, conflicts, monkeypatch):
    examples = conflicts[:5]
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    full = attribute_examples(model, tok, examples, progress=False)

    calls = []
    original = ContextAwareIntegratedGradients.attribute

    def dying(self, example, config=AttributionConfig(), kind="neuron"):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is killed while attributing the third example
        calls.append(example.id)
        return original(self, example, config, kind)

    monkeypatch.setattr(ContextAwareIntegratedGradients, "attribute", dying)
    store = AttributionStore(tmp_path / "store")
    with pytest.raises(KeyboardInterrupt):
        attribute_examples(model, tok, examples, store=store, header={"model": "tiny"}, progress=False)
    assert [store.has(e.id) for e in examples] == [True, True, False, False, False]
    assert not list((tmp_path / "store" / "examples").glob("*.tmp"))

    calls.clear()
    monkeypatch.setattr(ContextAwareIntegratedGradients, "attribute",
                        lambda self, ex, config=AttributionConfig(), kind="neuron":
                        (calls.append(ex.id), original(self, ex, config, kind))[1])
    resumed = attribute_examples(model, tok, examples, store=store, header={"model": "tiny"}, progress=False)
    assert calls == [e.id for e in examples[2:]]
    for a, b in zip(full, resumed):
        assert a.example_id == b.example_id and a.answer_token == b.answer_token
        assert torch.equal(a.scores, b.scores)
    assert [r.example_id for r in store.all()] == [e.id for e in examples]


def test_store_refuses_other_settings(tmp_path, tiny_llama, conflicts):
    store = AttributionStore(tmp_path / "s")
    attribute_examples(tiny_llama.model, tiny_llama.tokenizer, conflicts[:1], store=store,
                       header={"model": "tiny"}, progress=False)
    with pytest.raises(IrcanError, match="other settings"):
        attribute_examples(tiny_llama.model, tiny_llama.tokenizer, conflicts[:1],
                           AttributionConfig(n_steps=5), store=store, header={"model": "tiny"},
                           progress=False)
    with pytest.raises(IrcanError, match="--quadrature riemann --n-steps 20, not --quadrature gauss-legendre"):
        attribute_examples(tiny_llama.model, tiny_llama.tokenizer, conflicts[:1],
                           AttributionConfig(quadrature="gauss-legendre"), store=store, header={"model": "tiny"},
                           progress=False)
    with pytest.raises(IrcanError, match="other settings"):
        attribute_examples(tiny_llama.model, tiny_llama.tokenizer, conflicts[:1], store=store,
                           header={"model": "another"}, progress=False)


def test_pass_size_is_not_a_setting_of_the_store(tmp_path, tiny_llama, conflicts):
    """The batch size changes how the work is split, not the scores: a store resumes under any
    pass size, and one written when headers still recorded it resumes too."""
    store = AttributionStore(tmp_path / "s")
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    first = attribute_examples(model, tok, conflicts[:2], AttributionConfig(internal_batch_size=40), store=store,
                               header={"model": "tiny"}, progress=False)
    header = json.loads(store.header_path.read_text())
    assert "internal_batch_size" not in header["attribution"]
    header["attribution"]["internal_batch_size"] = 120  # as older versions wrote it
    store.header_path.write_text(json.dumps(header))
    records = attribute_examples(model, tok, conflicts[:2], AttributionConfig(internal_batch_size=20),
                                 store=AttributionStore(tmp_path / "s"), header={"model": "tiny"}, progress=False)
    assert [r.example_id for r in records] == [e.id for e in conflicts[:2]]
    assert all(torch.equal(a.scores, b.scores) for a, b in zip(first, records))  # read back, not redone


def test_version_1_store_is_readable_for_the_paper_rule_only(tmp_path, tiny_llama, conflicts):
    """A store written before activations were kept: select works, the signed rule and resuming
    give errors that say what to do."""
    store = AttributionStore(tmp_path / "old")
    records = attribute_examples(tiny_llama.model, tiny_llama.tokenizer, conflicts[:2],
                                 AttributionConfig(n_steps=2), store=store, progress=False)
    header = json.loads(store.header_path.read_text())
    header.pop("store_version")
    store.header_path.write_text(json.dumps(header))
    for r in records:  # rewrite each record as version 1 did: scores only
        r.activations_with = r.activations_without = None
        store.put(r)
    old = store.all()
    assert len(old) == 2 and old[0].activations_with is None
    neurons = select_units(old, SelectionConfig(num_neurons=2))
    assert neurons.neurons[0].effect is None
    neurons.scaled(2.0, "paper")
    with pytest.raises(IrcanError, match="no effect recorded.*version 2"):
        neurons.scaled(2.0, "signed")
    with pytest.raises(IrcanError, match="version 1.*attribute into a new folder"):
        attribute_examples(tiny_llama.model, tiny_llama.tokenizer, conflicts[:3], AttributionConfig(n_steps=2),
                           store=store, progress=False)
    with pytest.raises(IrcanError, match="version 2"):
        old[0].effect()


def test_unreadable_record_names_its_file(tmp_path, tiny_llama, conflicts):
    store = AttributionStore(tmp_path / "s")
    attribute_examples(tiny_llama.model, tiny_llama.tokenizer, conflicts[:1], AttributionConfig(n_steps=2),
                       store=store, progress=False)
    [path] = (tmp_path / "s" / "examples").glob("*.safetensors")
    path.write_bytes(b"garbage")
    with pytest.raises(IrcanError, match="unreadable.*delete it"):
        store.get(conflicts[0].id)
