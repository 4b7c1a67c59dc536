"""Attribution on Ray: 2 workers on a local cluster give what one process gives."""

import logging
import os

import pytest
import torch

from ircan_serve.attribution import AttributionStore, attribute_examples
from ircan_serve.attribution.ray import attribute_on_ray, check_address
from ircan_serve.config import AttributionConfig, SelectionConfig
from ircan_serve.data import load_examples
from ircan_serve.errors import IrcanError
from ircan_serve.models import load_model
from ircan_serve.selection import select_units

pytest.importorskip("ray", reason="the [ray] extra is not installed (make setup installs it)")

CONFIG = AttributionConfig(n_steps=4)
HEADER = {"model": "tiny", "data": "conflicts"}


@pytest.fixture(scope="module")
def one_process(tiny_llama_dir, tmp_path_factory):
    """Six shipped examples attributed in this process: the reference for the Ray runs. With the
    threads each of the two workers gets (half the cores): a thread count changes the order of
    float sums, so other counts agree only to ~1e-6."""
    lm = load_model(str(tiny_llama_dir))
    examples = load_examples("conflicts", limit=6, tokenizer=lm.tokenizer).examples
    store = AttributionStore(tmp_path_factory.mktemp("one") / "store")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        records = attribute_examples(lm.model, lm.tokenizer, examples, CONFIG, store=store, header=HEADER,
                                     progress=False)
    finally:
        torch.set_num_threads(threads)
    return examples, records


def _same(records, reference):
    assert [r.example_id for r in records] == [r.example_id for r in reference]
    for r, ref in zip(records, reference):
        assert r.answer_token == ref.answer_token
        assert torch.equal(r.scores, ref.scores)
        assert torch.equal(r.activations_with, ref.activations_with)


def test_two_workers_give_the_scores_and_neurons_of_one_process(tiny_llama_dir, one_process, tmp_path):
    examples, reference = one_process
    store = AttributionStore(tmp_path / "store")
    records = attribute_on_ray(str(tiny_llama_dir), examples, CONFIG, workers=2, store=store, header=HEADER,
                               progress=False)
    _same(records, reference)
    _same(store.all(), reference)  # every record written into the one store
    a, b = tmp_path / "ray.json", tmp_path / "one.json"
    select_units(records, SelectionConfig(num_neurons=8)).scaled(3.0, "signed").save(a)
    select_units(reference, SelectionConfig(num_neurons=8)).scaled(3.0, "signed").save(b)
    assert a.read_text() == b.read_text()


def test_dead_worker_is_restarted_and_its_example_redone(tiny_llama_dir, one_process, tmp_path, monkeypatch, caplog):
    """A worker dies (os._exit) while holding example 3: Ray restarts it, the example is scored
    again, the finished ones are kept; more workers than examples left are reduced, with a warning."""
    examples, reference = one_process
    store = AttributionStore(tmp_path / "store")
    # two examples already done by an earlier, killed run: they are kept, not recomputed
    store.open({**HEADER, "attribution": CONFIG.model_dump(), "example_ids": [e.id for e in examples]})
    for r in reference[:2]:
        store.put(r)
    marker = tmp_path / "died"
    monkeypatch.setenv("IRCAN_FAULT_KILL_WORKER", f"{examples[3].id}@{marker}")
    with caplog.at_level(logging.WARNING, logger="ircan_serve.distributed"):
        records = attribute_on_ray(str(tiny_llama_dir), examples, CONFIG, workers=8, store=store,
                                   header=HEADER, progress=False)
    assert marker.exists(), "the fault was not injected"
    assert "only 4 example(s) left" in caplog.text
    _same(records, reference)


def test_unanswering_address_fails_fast_with_a_clear_message():
    with pytest.raises(IrcanError, match="does not answer.*ray start --head"):
        check_address("127.0.0.1:1", timeout=2)
    with pytest.raises(IrcanError, match="not HOST:PORT"):
        check_address("nonsense")


def test_workers_below_one_are_refused(tiny_llama_dir, one_process):
    with pytest.raises(IrcanError, match="at least 1"):
        attribute_on_ray(str(tiny_llama_dir), one_process[0], CONFIG, workers=0, progress=False)
