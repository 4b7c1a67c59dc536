"""``ircan bench attribution``: the fast path against the reference, the full-stack path and,
optionally, another checkout's fast path (``--baseline``), each in a fresh process.

Methods: ``fast`` (the product's path), ``full-stack`` (the same cached passes running every
layer, as ircan-serve 0.1's fast path did) and ``reference`` (one layer at a time, full sequence).
Benchmarks never assert timings; they print what they measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import IrcanError
from .measure import PeakRSS, in_fresh_process
from .official import official_worker
from .rows import bench_examples, file_and_rows

ATTRIBUTION_METHODS = ("fast", "full-stack", "reference")
"""``fast``: the product's path; ``full-stack``: the same cached path running every layer in
each pass (ircan-serve 0.1's fast path); ``reference``: one layer at a time, full sequence."""

SPEED_GOAL = 1.7
"""The fast path's goal against ircan-serve 0.1's fast path (``--baseline``, a checkout of it;
without one the full-stack path stands in); the bench says what speed it needs."""

EXTRA_COLUMNS = {"paper": "fast at riemann 20 s", "official": "official script s (all layers)"}

WorkerResult = tuple[float, float, float, list[Any], float | None]
"""(mean prompt tokens, seconds per example, peak MiB, scores per example, FLOPs of the first)."""


@dataclass
class AttributionBench:
    label: str
    tokens: float
    """Mean prompt length of the timed examples."""
    layers: int
    examples: int
    seconds: dict[str, float]
    """Method -> seconds per example."""
    mib: dict[str, float]
    """Method -> peak RSS above the loaded model."""
    max_abs_diff: dict[str, float]
    """Method -> max |score - reference score| over the examples."""
    max_abs_score: float
    flops: dict[str, float] = field(default_factory=dict)
    """Method -> matrix-product FLOPs (forward and backward) of the first example, as
    ``torch.utils.flop_counter`` counts them (the fast paths only: the reference is too slow)."""

    def ratio(self, slow: str, fast: str = "fast") -> float:
        return self.seconds[slow] / self.seconds[fast]

    def gflops(self, method: str = "fast") -> float:
        """Matrix-product GFLOP/s the method reached (its FLOPs over its seconds per example)."""
        return self.flops[method] / self.seconds[method] / 1e9


def _full_stack(lm: Any, config: Any) -> Any:
    """Scores of the fast passes with every layer run in each pass (no replay of lower layers):
    ircan-serve 0.1's fast path, composed from the library's parts."""
    import torch

    from ..answers import answer_token_id
    from ..attribution.fast import fast_scores
    from ..attribution.hooks import plain_pass
    from ..attribution.prefix_cache import prompt_prefix
    from ..attribution.quadrature import quadrature
    from ..prompts import encode
    from ..units import projections

    units = projections(lm.model)

    def scores(example: Any) -> torch.Tensor:
        ids = torch.tensor([encode(lm.tokenizer, example.prompt)])
        token = answer_token_id(lm.tokenizer, example.prompt, example.answer)
        without = plain_pass(lm.model, units, torch.tensor([encode(lm.tokenizer, example.prompt_without_context)]), token)
        with_ = plain_pass(lm.model, units, ids, token, keep_cache=True)
        return fast_scores(lm.model, units, ids, prompt_prefix(lm.model, ids, with_.cache), without.activations,
                           with_.activations, token, quadrature(config.quadrature, config.n_steps), config.layers)

    return scores


def attribution_worker(model_spec: str, source: str, method: str, layers: list[int], n_steps: int,
                       count_flops: bool = True, quadrature: str = "riemann") -> WorkerResult:
    """In a fresh process: load, warm up with the timed shapes, then time each example.

    Memory is the peak RSS above the level after loading the model, warm-up included, so each
    method's working set is measured alone. FLOPs are counted after timing (the counter slows
    every operation down), for the fast paths only.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ..attribution import ContextAwareIntegratedGradients
    from ..config import AttributionConfig
    from ..models import load_model

    lm = load_model(model_spec)
    examples = bench_examples(lm.tokenizer, source)
    config = AttributionConfig(method="reference" if method == "reference" else "fast", layers=layers, n_steps=n_steps,
                               quadrature=quadrature)
    ig = ContextAwareIntegratedGradients(lm.model, lm.tokenizer)
    run = _full_stack(lm, config) if method == "full-stack" else (lambda e, c=config: ig.attribute(e, c).scores)
    warm = ((lambda e: ig.attribute(e, config.model_copy(update={"layers": layers[:1]})).scores)
            if method == "reference" else run)
    with PeakRSS() as mem:
        warm(examples[0])  # the first call of a shape pays for kernel selection
        t0 = time.perf_counter()
        scores = [torch.Tensor.numpy(run(e).detach()) for e in examples]
        seconds = (time.perf_counter() - t0) / len(examples)
    n_tok = sum(len(lm.tokenizer(e.prompt)["input_ids"]) for e in examples) / len(examples)
    flops = None
    if method != "reference" and count_flops:
        with FlopCounterMode(display=False) as counter:
            run(examples[0])
        flops = float(counter.get_total_flops())
    return n_tok, seconds, mem.mib, scores, flops


def baseline_worker(root: str, model_spec: str, source: str, layers: list[int], n_steps: int) -> WorkerResult:
    """The fast path of another checkout (``root`` holds its ``ircan_serve``, e.g. ``git worktree
    add ../ircan-old COMMIT``), timed by :mod:`.baseline_worker` in its own interpreter."""
    import numpy as np

    path, k = file_and_rows(source)
    script = Path(__file__).with_name("baseline_worker.py")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "scores.npy"
        proc = subprocess.run([sys.executable, str(script), str(Path(root).resolve()), model_spec, path, str(k),
                               json.dumps(layers), str(n_steps), str(out)], capture_output=True, text=True)
        if proc.returncode:
            raise IrcanError(f"the baseline in {root} failed:\n{proc.stderr[-2000:]}")
        seconds = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
        return float("nan"), seconds, float("nan"), list(np.load(out)), None


def _layers_for(source: str, n_layers: int, reference_layers: int | None) -> list[int]:
    """Every layer for prompts under 100 tokens, 3 spread over the depth above (the reference is slow)."""
    long = source.startswith("len:") and int(source[4:]) >= 100
    k = reference_layers or (3 if long else n_layers)
    return sorted({round(i * (n_layers - 1) / max(1, k - 1)) for i in range(k)})


def _row(source: str, layers: list[int], out: dict[str, WorkerResult]) -> AttributionBench:
    import numpy as np

    ref = out["reference"][3]
    return AttributionBench(
        label=source, tokens=out["fast"][0], layers=len(layers), examples=len(ref),
        seconds={m: o[1] for m, o in out.items()}, mib={m: o[2] for m, o in out.items()},
        max_abs_diff={m: max(float(np.abs(a - b).max()) for a, b in zip(o[3], ref))
                      for m, o in out.items() if m not in ("paper", "official", "fast-all")},
        max_abs_score=max(float(np.abs(r).max()) for r in ref),
        flops={m: o[4] for m, o in out.items() if o[4] is not None},
    )


def bench_attribution(model_spec: str, sources: list[str], n_steps: int,
                      reference_layers: int | None, baseline: str | None = None, quadrature: str = "riemann",
                      official: str | None = None) -> list[AttributionBench]:
    """Time the three methods on the same examples and layers, each in its own process.

    ``sources``: ``len:N`` (a shipped question padded to ~N tokens) or ``FILE[:K]`` (its first K
    rows, e.g. MemoTrap). ``baseline``: the root of another checkout, whose fast path is timed too
    (method ``baseline``; data rows only).
    """
    from tqdm.auto import tqdm
    from transformers import AutoConfig

    from ..models import resolve_model

    if baseline and not (Path(baseline) / "ircan_serve").is_dir():
        raise IrcanError(f"--baseline {baseline}: no ircan_serve package there (pass a checkout's root)")
    n_layers = AutoConfig.from_pretrained(resolve_model(model_spec)).num_hidden_layers
    timed_by_baseline = [s for s in sources if baseline and not s.startswith("len:")]  # data rows only
    rows = []
    paper = (quadrature, n_steps) != ("riemann", 20)
    runs = len(sources) * (len(ATTRIBUTION_METHODS) + paper + bool(official)) + len(timed_by_baseline)
    with tqdm(total=runs, desc="bench attribution", unit="run") as bar:
        for source in sources:
            layers = _layers_for(source, n_layers, reference_layers)
            out = {}
            for method in ATTRIBUTION_METHODS:
                out[method] = in_fresh_process(attribution_worker, model_spec, source, method, layers, n_steps,
                                               True, quadrature)
                bar.update(1)
            if paper:
                out["paper"] = in_fresh_process(attribution_worker, model_spec, source, "fast", layers, 20, False)
                bar.update(1)
            if baseline and source in timed_by_baseline:
                out["baseline"] = baseline_worker(baseline, model_spec, source, layers, n_steps)
                bar.update(1)
            if official:  # the script scores every layer: so does the fast path it is compared with
                out["official"] = official_worker(official, model_spec, source)
                if len(layers) < n_layers:
                    out["fast-all"] = in_fresh_process(attribution_worker, model_spec, source, "fast",
                                                       list(range(n_layers)), n_steps, False, quadrature)
                bar.update(1)
            rows.append(_row(source, layers, out))
    return rows


def bench_pairs(model_spec: str, source: str, baseline: str, pairs: int, n_steps: int) -> list[tuple[float, float]]:
    """``pairs`` interleaved runs on the data rows ``source``: the fast path of the ``baseline``
    checkout, then this one's, each in a fresh process (all layers; seconds per example after a
    warm-up). Returns (baseline s, fast s) per pair. On a shared machine whose speed drifts
    between runs, the median of the per-pair ratios is steadier than one run of each."""
    from tqdm.auto import tqdm
    from transformers import AutoConfig

    from ..models import resolve_model

    layers = list(range(AutoConfig.from_pretrained(resolve_model(model_spec)).num_hidden_layers))
    out = []
    for _ in tqdm(range(pairs), desc="interleaved pairs", unit="pair"):
        old = baseline_worker(baseline, model_spec, source, layers, n_steps)[1]
        new = in_fresh_process(attribution_worker, model_spec, source, "fast", layers, n_steps, False)[1]
        out.append((old, new))
    return out


def add_arguments(b: Any) -> None:
    b.add_argument("--model", default="smollm2")
    b.add_argument("--lengths", type=int, nargs="*", default=[30, 300], help="prompt lengths (tokens)")
    b.add_argument("--data", nargs="*", default=[], metavar="FILE[:K]",
                   help="also time the first K (default 3) rows of a data file, e.g. "
                        "../shared/data/memotrap/...:3")
    b.add_argument("--reference-layers", type=int, default=None,
                   help="score only this many layers (spread over the depth) in both methods; "
                        "default: all for prompts under 100 tokens, 3 above")
    b.add_argument("--n-steps", type=int, default=20, help="integration points of the timed setting")
    b.add_argument("--quadrature", default="riemann", choices=["riemann", "gauss-legendre"],
                   help="the timed setting's quadrature; another than the paper's (riemann, 20) also times the "
                        "fast path at the paper's setting")
    b.add_argument("--official", metavar="DIR",
                   help="also time the official IRCAN script (the root of github.com/danshi777/IRCAN; needs "
                        "the jsonlines package) on the same rows, every layer")
    b.add_argument("--baseline", metavar="DIR",
                   help="also time the fast path of another checkout (its root, e.g. a `git worktree` of "
                        "an earlier commit) on the --data rows")
    b.add_argument("--pairs", type=int, default=0, metavar="N",
                   help="with --baseline: then N interleaved pairs of fresh processes (baseline, fast) on each "
                        "--data source, and the median of their ratios")


def _table(rows: list[AttributionBench], ns: Any) -> Any:
    from rich.table import Table

    table = Table(title=f"attribution, {ns.model}, {ns.quadrature} {ns.n_steps} points, one run; seconds per example, "
                        "each method in its own process, peak = RSS above the loaded model")
    cols = ["examples", "prompt tokens", "layers", "reference s", "full-stack s", "fast s", "fast vs reference",
            "fast vs full-stack", "peak MiB ref / full / fast", "max |fast - ref| / max |score|",
            "GFLOP per example full / fast", "matmul GFLOP/s full / fast"]
    if ns.baseline:
        cols += ["baseline s", "fast vs baseline", "max |baseline - ref| / max |score|"]
    extra = [m for m in ("paper", "official") if any(m in r.seconds for r in rows)]
    cols += [c for m in extra for c in (EXTRA_COLUMNS[m], f"fast vs {m}")]
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        cells = [
            f"{r.label} ({r.examples})", f"{r.tokens:.0f}", str(r.layers), f"{r.seconds['reference']:.2f}",
            f"{r.seconds['full-stack']:.2f}", f"{r.seconds['fast']:.2f}", f"{r.ratio('reference'):.1f}x",
            f"{r.ratio('full-stack'):.2f}x", " / ".join(f"{r.mib[m]:.0f}" for m in ("reference", "full-stack", "fast")),
            f"{r.max_abs_diff['fast'] / r.max_abs_score:.1e}",
            f"{r.flops['full-stack'] / 1e9:.0f} / {r.flops['fast'] / 1e9:.0f}",
            f"{r.gflops('full-stack'):.0f} / {r.gflops('fast'):.0f}",
        ]
        if ns.baseline:
            cells += ([f"{r.seconds['baseline']:.2f}", f"{r.ratio('baseline'):.2f}x",
                       f"{r.max_abs_diff['baseline'] / r.max_abs_score:.1e}"] if "baseline" in r.seconds else ["-"] * 3)
        for m in extra:
            ours = r.seconds.get("fast-all", r.seconds["fast"]) if m == "official" else r.seconds["fast"]
            cells += [f"{r.seconds[m]:.2f}", f"{r.seconds[m] / ours:.1f}x"] if m in r.seconds else ["-", "-"]
        table.add_row(*cells)
    return table


def _print_pairs(console: Any, ns: Any) -> None:
    import statistics

    for source in ns.data:
        timed = bench_pairs(ns.model, source, ns.baseline, ns.pairs, ns.n_steps)
        ratios = [old / new for old, new in timed]
        console.print(
            f"{source}: {len(timed)} interleaved pairs (baseline, then fast; fresh processes), seconds per "
            f"example: baseline {' '.join(f'{o:.2f}' for o, _ in timed)}, fast "
            f"{' '.join(f'{n:.2f}' for _, n in timed)}; fast vs baseline per pair: median "
            f"{statistics.median(ratios):.2f}x (min {min(ratios):.2f}x, max {max(ratios):.2f}x)")


def main(ns: Any) -> None:
    from rich.console import Console

    from .measure import matmul_peak_gflops

    if ns.pairs < 0:
        raise IrcanError(f"--pairs {ns.pairs}: give a number of pairs, 1 or more")
    if ns.pairs and not (ns.baseline and ns.data):
        raise IrcanError("--pairs times a baseline checkout against this one on data rows: "
                         "give --baseline DIR and --data FILE[:K] too")
    rows = bench_attribution(ns.model, [f"len:{n}" for n in ns.lengths] + list(ns.data), ns.n_steps,
                             ns.reference_layers, ns.baseline, ns.quadrature, ns.official)
    console = Console(width=240)
    console.print(_table(rows, ns))
    peak = in_fresh_process(matmul_peak_gflops)
    console.print(f"this machine's float32 matrix product (2048 x 2048 x 2048, best of 8): {peak:.0f} GFLOP/s")
    if ns.pairs and ns.baseline:
        _print_pairs(console, ns)
    for r in rows:
        if "official" in r.seconds:
            ours = r.seconds.get("fast-all", r.seconds["fast"])
            console.print(f"{r.label}: the official script {r.seconds['official']:.1f} s per example, this fast path "
                          f"({ns.quadrature} {ns.n_steps}, every layer) {ours:.2f} s: {r.seconds['official'] / ours:.1f}x")
        against = "baseline" if "baseline" in r.seconds else "full-stack"
        need = r.flops["fast"] / (r.seconds[against] / SPEED_GOAL) / 1e9
        console.print(f"{r.label}: {SPEED_GOAL}x the {against} path needs the fast path's "
                      f"{r.flops['fast'] / 1e9:.0f} GFLOP per example at {need:.0f} GFLOP/s, "
                      f"{need / peak:.0%} of that peak (it runs at {r.gflops() / peak:.0%}: "
                      f"{r.ratio(against):.2f}x)")
