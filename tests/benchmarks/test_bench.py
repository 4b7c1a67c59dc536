"""`ircan bench attribution` measures what it says: the same scores, and the FLOPs it reports."""

from pathlib import Path

import pytest

from ircan_serve.benchmarks.attribution import bench_attribution, bench_pairs
from ircan_serve.benchmarks.measure import matmul_peak_gflops
from ircan_serve.errors import IrcanError

REPO = Path(__file__).resolve().parents[2]


def test_attribution_bench_reports_equal_scores_and_fewer_flops_for_the_fast_path(tiny_llama_dir):
    # this checkout doubles as the baseline checkout: it must give the fast path's scores
    (row,) = bench_attribution(str(tiny_llama_dir), ["conflicts:2"], n_steps=3, reference_layers=None,
                               baseline=str(REPO))
    assert row.examples == 2 and row.layers >= 2
    assert row.max_abs_diff["fast"] <= 1e-4 * row.max_abs_score
    assert row.max_abs_diff["full-stack"] <= 1e-4 * row.max_abs_score
    assert set(row.flops) == {"full-stack", "fast"}  # the reference is not counted
    # starting each row at its layer does strictly less matrix work than running every layer
    assert 0 < row.flops["fast"] < row.flops["full-stack"]
    assert row.gflops("fast") > 0
    assert row.seconds["baseline"] > 0
    assert row.max_abs_diff["baseline"] <= 1e-4 * row.max_abs_score


def test_baseline_must_be_a_checkout(tmp_path, tiny_llama_dir):
    with pytest.raises(IrcanError, match="no ircan_serve package there"):
        bench_attribution(str(tiny_llama_dir), ["conflicts:1"], n_steps=2, reference_layers=None,
                          baseline=str(tmp_path))


def test_matmul_peak_is_a_speed():
    assert matmul_peak_gflops(size=256, repeats=2) > 0


def test_interleaved_pairs_time_the_baseline_then_the_fast_path(tiny_llama_dir):
    timed = bench_pairs(str(tiny_llama_dir), "conflicts:1", baseline=str(REPO), pairs=2, n_steps=2)
    assert len(timed) == 2
    assert all(old > 0 and new > 0 for old, new in timed)


@pytest.mark.parametrize(("flags", "message"), [
    (["--pairs", "2", "--data", "conflicts:1"], "give --baseline DIR and --data"),
    (["--pairs", "2", "--baseline", str(REPO)], "give --baseline DIR and --data"),
    (["--pairs", "-1"], "give a number of pairs"),
])
def test_pairs_need_a_baseline_and_data_rows(flags, message, capsys):
    from ircan_serve.cli import main

    assert main(["bench", "attribution", "--lengths", *flags]) == 2
    assert message in capsys.readouterr().err


def test_the_official_script_is_timed_by_its_own_timer(tmp_path, tiny_llama_dir):
    """A stand-in for the IRCAN repository's script: the bench hands it the rows in MemoTrap's layout
    and the paper's flags, and reads its per-run timer; the Gauss-Legendre setting is timed against
    the paper's too."""
    script = tmp_path / "IRCAN" / "src" / "1_calculate_attribution_completion.py"
    script.parent.mkdir(parents=True)
    script.write_text(
        "import sys, json\n"
        "args = {a: sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a.startswith('--')}\n"
        "assert '--no_cuda' in sys.argv and args['--batch_size'] == '20' and args['--batch_size_per_inference'] == '2'\n"
        "rows = [json.loads(l) for l in open(args['--data_path'])]\n"
        "assert all({'prompt', 'classes', 'answer_index'} <= set(r) for r in rows)\n"
        "print('***** Costing time: %.1f seconds *****' % (3.0 * len(rows)))\n")
    (row,) = bench_attribution(str(tiny_llama_dir), ["conflicts:2"], n_steps=4, reference_layers=None,
                               quadrature="gauss-legendre", official=str(tmp_path / "IRCAN"))
    assert row.seconds["official"] == 3.0 and row.seconds["paper"] > 0
    assert row.max_abs_diff["fast"] <= 1e-4 * row.max_abs_score  # fast = reference at the timed setting
    with pytest.raises(IrcanError, match="no src/1_calculate_attribution_completion.py there"):
        bench_attribution(str(tiny_llama_dir), ["conflicts:1"], n_steps=2, reference_layers=None,
                          official=str(tmp_path))


def test_cad_bench_rows_take_three_context_formats_in_the_served_template():
    from ircan_serve.benchmarks.cad import cad_rows
    from ircan_serve.data.contexts import format_of
    from ircan_serve.prompts import COMPLETION_TEMPLATE

    rows = cad_rows(9)
    assert [format_of(e) for e in rows] == ["sentence", "passage-list", "topk"] * 3
    # the transformers side scores exactly what the wrapper's context slot sends
    assert all(e.prompt == COMPLETION_TEMPLATE.render(e.question or "", e.context) for e in rows)
    assert len({e.id.split("@")[0] for e in rows}) == 9
