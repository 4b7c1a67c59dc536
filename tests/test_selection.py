import pytest
import torch

from ircan_serve.config import SelectionConfig
from ircan_serve.errors import IrcanError
from ircan_serve.selection import example_top_units, select_units
from ircan_serve.units import UnitSet


def test_threshold_and_top_z():
    s = torch.zeros(2, 5)
    s[0, 1], s[1, 4], s[1, 2], s[0, 0] = 1.0, 0.5, 0.05, -2.0
    assert example_top_units(s, 0.1, 20) == [(0, 1, 1.0), (1, 4, 0.5)]  # 0.05 < 0.1 * max
    assert example_top_units(s, 0.01, 2) == [(0, 1, 1.0), (1, 4, 0.5)]  # z = 2 cuts 0.05
    assert example_top_units(-s.abs(), 0.1, 20) == []  # nothing positive


def test_counts_across_examples_then_mean_score():
    a, b, c = torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4)
    a[1, 3], a[0, 2] = 1.0, 0.9
    b[1, 3], b[0, 1] = 1.0, 0.95
    c[0, 2], c[1, 3] = 0.2, 1.0
    ns = select_units([a, b, c], SelectionConfig(num_neurons=2))
    assert [(n.layer, n.index, n.count) for n in ns.neurons] == [(1, 3, 3), (0, 2, 2)]
    assert ns.neurons[1].mean_score == pytest.approx(0.55)
    assert ns.n_examples == 3


def test_round_trip_and_errors(tmp_path):
    ns = select_units([torch.eye(3)], SelectionConfig(num_neurons=3))
    ns.save(tmp_path / "n.json")
    assert UnitSet.load(tmp_path / "n.json") == ns
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(IrcanError, match="not a valid neurons file"):
        UnitSet.load(tmp_path / "bad.json")
    with pytest.raises(IrcanError, match="no attribution scores"):
        select_units([])
