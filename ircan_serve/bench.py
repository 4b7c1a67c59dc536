"""``ircan bench``: speed and memory measured as ratios within one run.

Benchmarks never assert timings (tests check behaviour); they print what they measured.
"""

from __future__ import annotations

import argparse
import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .data import QA_TEMPLATE, ConflictExample, load_examples


class PeakRSS:
    """Peak resident memory of this process above its level at start, sampled every 5 ms."""

    def __enter__(self) -> "PeakRSS":
        import psutil

        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, seconds, peak extra MiB) of one call."""
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return out, seconds, mem.mib


def prompt_of_length(tokenizer: Any, n_tokens: int) -> ConflictExample:
    """A shipped conflict question whose context is padded with other conflict facts to ~n tokens."""
    examples = load_examples("conflicts").examples
    target = examples[12]  # the India / China example
    facts = [e.context for e in examples if e.id != target.id and e.context]
    context = target.context or ""
    i = 0
    while len(tokenizer(QA_TEMPLATE.render(target.question or "", context))["input_ids"]) < n_tokens:
        context = facts[i % len(facts)] + " " + context
        i += 1
    return target.model_copy(update={
        "id": f"bench-{n_tokens}", "prompt": QA_TEMPLATE.render(target.question or "", context),
        "context": context,
    })


ATTRIBUTION_METHODS = ("fast", "full-stack", "reference")
"""``fast``: the product's path; ``full-stack``: the same cached path running every layer in
each pass (ircan-serve 0.1's fast path); ``reference``: one layer at a time, full sequence."""

SPEED_GOAL = 1.7
"""The fast path's goal against ircan-serve 0.1's fast path (``--baseline``, a checkout of it;
without one the full-stack path stands in); the bench says what speed it needs."""


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


_BASELINE_SCRIPT = """\
import json, sys, time
root, model_spec, path, k, layers, n_steps, out = sys.argv[1:8]
sys.path.insert(0, root)
import numpy as np
import ircan_serve
from ircan_serve.attribution import ContextAwareIntegratedGradients
from ircan_serve.config import AttributionConfig
from ircan_serve.data import load_examples
from ircan_serve.models import load_model
assert ircan_serve.__file__.startswith(root), ircan_serve.__file__
lm = load_model(model_spec)
examples = load_examples(path, limit=int(k), tokenizer=lm.tokenizer).examples
ig = ContextAwareIntegratedGradients(lm.model, lm.tokenizer)
config = AttributionConfig(layers=json.loads(layers), n_steps=int(n_steps))
ig.attribute(examples[0], config)
t0 = time.perf_counter()
scores = [ig.attribute(e, config).scores.numpy() for e in examples]
seconds = (time.perf_counter() - t0) / len(examples)
np.save(out, np.stack(scores))
print(json.dumps({"seconds": seconds}))
"""


def _baseline_worker(root: str, model_spec: str, source: str, layers: list[int],
                     n_steps: int) -> tuple[float, float, float, list[Any], None]:
    """The fast path of another checkout of ircan-serve, timed like :func:`_attribution_worker`
    (warm-up, then seconds per example) in its own interpreter. ``root`` holds that version's
    ``ircan_serve`` package, e.g. ``git worktree add ../ircan-old COMMIT``; only its public
    attribution API is used."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import numpy as np

    from .errors import IrcanError

    path, k = _file_and_rows(source)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "scores.npy"
        proc = subprocess.run(
            [sys.executable, "-c", _BASELINE_SCRIPT, str(Path(root).resolve()), model_spec, path, str(k),
             json.dumps(layers), str(n_steps), str(out)], capture_output=True, text=True)
        if proc.returncode:
            raise IrcanError(f"the baseline in {root} failed:\n{proc.stderr[-2000:]}")
        seconds = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
        return float("nan"), seconds, float("nan"), list(np.load(out)), None


def matmul_peak_gflops(size: int = 2048, repeats: int = 8) -> float:
    """This machine's float32 matrix-product speed: the best of ``repeats`` square products,
    with torch's threads, in GFLOP/s; the ceiling the attribution paths can approach."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def _bench_examples(tokenizer: Any, source: str) -> list[ConflictExample]:
    """``len:N`` -> the padded shipped example of ~N tokens; ``FILE[:K]`` -> the first K rows (3)."""
    if source.startswith("len:"):
        return [prompt_of_length(tokenizer, int(source[4:]))]
    path, k = _file_and_rows(source)
    return load_examples(path, limit=k, tokenizer=tokenizer).examples


def _file_and_rows(source: str) -> tuple[str, int]:
    """``FILE[:K]`` -> (FILE, K), K = 3 when not given."""
    path, _, k = source.rpartition(":") if source.rsplit(":", 1)[-1].isdigit() else (source, "", "3")
    return path, int(k)


def _attribution_worker(model_spec: str, source: str, method: str, layers: list[int] | None,
                        n_steps: int, count_flops: bool = True) -> tuple[float, float, float, list[Any], float | None]:
    """In a fresh process: load, warm up with the timed shapes, then time each example.

    Returns mean prompt tokens, seconds per example, peak MiB, the scores and (fast paths only)
    the matrix-product FLOPs of the first example. Memory is the peak RSS above the level after
    loading the model, warm-up included, so each method's working set is measured alone.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .attribution import ContextAwareIntegratedGradients
    from .config import AttributionConfig
    from .models import load_model

    lm = load_model(model_spec)
    ig = ContextAwareIntegratedGradients(lm.model, lm.tokenizer, replay_lower_layers=method != "full-stack")
    examples = _bench_examples(lm.tokenizer, source)
    config = AttributionConfig(method="reference" if method == "reference" else "fast",
                               layers=layers, n_steps=n_steps)
    warm = config.model_copy(update={"layers": (layers or [0])[:1]}) if method == "reference" else config
    with PeakRSS() as mem:
        ig.attribute(examples[0], warm)  # the first call of a shape pays for kernel selection
        t0 = time.perf_counter()
        scores = [torch.Tensor.numpy(ig.attribute(e, config).scores) for e in examples]
        seconds = (time.perf_counter() - t0) / len(examples)
    n_tok = sum(len(lm.tokenizer(e.prompt)["input_ids"]) for e in examples) / len(examples)
    flops = None
    if method != "reference" and count_flops:  # counted after timing: the counter slows every operation down
        with FlopCounterMode(display=False) as counter:
            ig.attribute(examples[0], config)
        flops = float(counter.get_total_flops())
    return n_tok, seconds, mem.mib, scores, flops


def _in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a new spawned process, so that no state of an earlier run is shared."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def bench_attribution(model_spec: str, sources: list[str], n_steps: int,
                      reference_layers: int | None, baseline: str | None = None) -> list[AttributionBench]:
    """Time the three methods on the same examples and layers, each in its own process.

    ``sources``: ``len:N`` (a shipped question padded to ~N tokens) or ``FILE[:K]`` (its first K
    rows, e.g. MemoTrap). Every layer is scored for prompts under 100 tokens, 3 above (the
    reference is slow), unless ``reference_layers`` says otherwise. ``baseline``: the root of
    another checkout, whose fast path is timed too (method ``baseline``; data rows only).
    """
    from pathlib import Path

    import numpy as np
    from transformers import AutoConfig
    from tqdm.auto import tqdm

    from .errors import IrcanError
    from .models import resolve_model

    if baseline and not (Path(baseline) / "ircan_serve" / "attribution.py").is_file():
        raise IrcanError(f"--baseline {baseline}: no ircan_serve package there (pass a checkout's root)")

    n_layers = AutoConfig.from_pretrained(resolve_model(model_spec)).num_hidden_layers
    rows = []
    timed_by_baseline = [s for s in sources if baseline and not s.startswith("len:")]  # data rows only
    runs = len(sources) * len(ATTRIBUTION_METHODS) + len(timed_by_baseline)
    with tqdm(total=runs, desc="bench attribution", unit="run") as bar:
        for source in sources:
            long = source.startswith("len:") and int(source[4:]) >= 100
            k = reference_layers or (3 if long else n_layers)
            layers = sorted({round(i * (n_layers - 1) / max(1, k - 1)) for i in range(k)})
            out = {}
            for method in ATTRIBUTION_METHODS:
                out[method] = _in_fresh_process(_attribution_worker, model_spec, source, method, layers, n_steps)
                bar.update(1)
            if source in timed_by_baseline:
                out["baseline"] = _baseline_worker(baseline, model_spec, source, layers, n_steps)
                bar.update(1)
            ref = out["reference"][3]
            rows.append(AttributionBench(
                label=source, tokens=out["fast"][0], layers=len(layers), examples=len(ref),
                seconds={m: o[1] for m, o in out.items()}, mib={m: o[2] for m, o in out.items()},
                max_abs_diff={m: max(float(np.abs(a - b).max()) for a, b in zip(o[3], ref))
                              for m, o in out.items()},
                max_abs_score=max(float(np.abs(r).max()) for r in ref),
                flops={m: o[4] for m, o in out.items() if o[4] is not None},
            ))
    return rows


def bench_pairs(model_spec: str, source: str, baseline: str, pairs: int, n_steps: int) -> list[tuple[float, float]]:
    """``pairs`` interleaved runs on the data rows ``source``: the fast path of the ``baseline``
    checkout, then this one's, each in a fresh process (all layers; seconds per example after a
    warm-up). Returns (baseline s, fast s) per pair. On a shared machine whose speed drifts
    between runs, the median of the per-pair ratios is steadier than one run of each."""
    from transformers import AutoConfig
    from tqdm.auto import tqdm

    from .models import resolve_model

    layers = list(range(AutoConfig.from_pretrained(resolve_model(model_spec)).num_hidden_layers))
    out = []
    for _ in tqdm(range(pairs), desc="interleaved pairs", unit="pair"):
        old = _baseline_worker(baseline, model_spec, source, layers, n_steps)[1]
        new = _in_fresh_process(_attribution_worker, model_spec, source, "fast", layers, n_steps, False)[1]
        out.append((old, new))
    return out


def bench_ray(model_spec: str, rows: int, workers: int, n_steps: int) -> dict[str, Any]:
    """One process (every core) vs ``workers`` Ray actors (cores split between them) on the same
    shipped rows. Ray's start-up is timed apart; the Ray run includes its workers' model loads."""
    import ray
    import torch

    from .attribution import attribute_examples
    from .config import AttributionConfig, SelectionConfig
    from .distributed import attribute_on_ray, init_ray
    from .models import load_model
    from .selection import select_neurons

    lm = load_model(model_spec)
    examples = load_examples("conflicts", limit=rows, tokenizer=lm.tokenizer).examples
    config = AttributionConfig(n_steps=n_steps)
    attribute_examples(lm.model, lm.tokenizer, examples[:1], config, progress=False)  # warm-up
    t0 = time.perf_counter()
    one = attribute_examples(lm.model, lm.tokenizer, examples, config)
    one_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    init_ray(workers)
    init_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        many = attribute_on_ray(lm.source, examples, config, workers=workers)
        ray_s = time.perf_counter() - t0
    finally:
        ray.shutdown()
    selection = SelectionConfig(num_neurons=10)

    def ranked(records: list[Any]) -> list[tuple[int, int, int]]:
        return [(n.layer, n.index, n.count) for n in select_neurons(records, selection).neurons]

    return {
        "rows": len(examples), "workers": workers, "one_s": one_s, "ray_s": ray_s, "init_s": init_s,
        "max_rel_diff": max(float((a.scores - b.scores).abs().max() / b.scores.abs().max())
                            for a, b in zip(one, many)),
        "bitwise": all(torch.equal(a.scores, b.scores) for a, b in zip(one, many)),
        "same_neurons": ranked(one) == ranked(many),
    }


def run(ns: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    if ns.bench == "eval":
        r = bench_eval(ns.model, ns.rows, ns.max_tokens, ns.grid_rows, ns.grid_tokens, ns.score_rows)
        console = Console(width=140)
        console.print(f"CAD (alpha 0.5), {r['rows']} prompts x {r['tokens']} tokens, one run: "
                      f"naive {r['cad_naive_s']:.2f} s, cached {r['cad_cached_s']:.2f} s, "
                      f"speed-up {r['cad_naive_s'] / r['cad_cached_s']:.1f}x, identical outputs: {bool(r['same_output'])}")
        console.print(f"one scoring pass, {r['rag_rows']} RAG prompts of ~{r['rag_tokens']} tokens: all positions "
                      f"{r['score_all_s']:.1f} s / {r['score_all_mib']:.0f} MiB, last position only "
                      f"{r['score_last_s']:.1f} s / {r['score_last_mib']:.0f} MiB: "
                      f"{r['score_all_s'] / r['score_last_s']:.1f}x faster (max logit diff {r['score_max_diff']:.1e})")
        console.print(f"tuning grid of {r['grid_points']} points on {r['grid_rows']} such rows: all positions {r['grid_all_s']:.0f} s, "
                      f"last position {r['grid_s']:.0f} s: {r['grid_all_s'] / r['grid_s']:.1f}x "
                      f"(same dev accuracies: {bool(r['grid_same'])})")
        return
    if ns.bench == "ray":
        r = bench_ray(ns.model, ns.rows, ns.workers, ns.n_steps)
        Console(width=160).print(
            f"attribution of {r['rows']} shipped rows, {ns.model}, one run: 1 process {r['one_s']:.1f} s, "
            f"{r['workers']} Ray workers {r['ray_s']:.1f} s (their model loads included; Ray start-up "
            f"{r['init_s']:.1f} s apart): {r['one_s'] / r['ray_s']:.2f}x. Scores: max |diff| / max |score| "
            f"{r['max_rel_diff']:.1e} (bit-identical: {r['bitwise']}); same top-10 neurons and counts: {r['same_neurons']}")
        return
    if ns.bench == "serve":
        print_serve(bench_serve(ns.checkpoint, ns.base, ns.concurrency, ns.max_tokens), ns.concurrency)
        return
    if ns.bench == "attribution":
        from .errors import IrcanError

        if ns.pairs < 0:
            raise IrcanError(f"--pairs {ns.pairs}: give a number of pairs, 1 or more")
        if ns.pairs and not (ns.baseline and ns.data):
            raise IrcanError("--pairs times a baseline checkout against this one on data rows: "
                             "give --baseline DIR and --data FILE[:K] too")
        sources = [f"len:{n}" for n in ns.lengths] + list(ns.data)
        rows = bench_attribution(ns.model, sources, ns.n_steps, ns.reference_layers, ns.baseline)
        table = Table(title=f"attribution, {ns.model}, m = {ns.n_steps}, one run; seconds per example, "
                            "each method in its own process, peak = RSS above the loaded model")
        for col in ("examples", "prompt tokens", "layers", "reference s", "full-stack s", "fast s",
                    "fast vs reference", "fast vs full-stack", "peak MiB ref / full / fast",
                    "max |fast - ref| / max |score|", "GFLOP per example full / fast",
                    "matmul GFLOP/s full / fast"):
            table.add_column(col, justify="right")
        if ns.baseline:
            for col in ("baseline s", "fast vs baseline", "max |baseline - ref| / max |score|"):
                table.add_column(col, justify="right")
        for r in rows:
            cells = [
                f"{r.label} ({r.examples})", f"{r.tokens:.0f}", str(r.layers), f"{r.seconds['reference']:.2f}",
                f"{r.seconds['full-stack']:.2f}", f"{r.seconds['fast']:.2f}", f"{r.ratio('reference'):.1f}x",
                f"{r.ratio('full-stack'):.2f}x",
                " / ".join(f"{r.mib[m]:.0f}" for m in ("reference", "full-stack", "fast")),
                f"{r.max_abs_diff['fast'] / r.max_abs_score:.1e}",
                f"{r.flops['full-stack'] / 1e9:.0f} / {r.flops['fast'] / 1e9:.0f}",
                f"{r.gflops('full-stack'):.0f} / {r.gflops('fast'):.0f}",
            ]
            if ns.baseline:
                cells += ([f"{r.seconds['baseline']:.2f}", f"{r.ratio('baseline'):.2f}x",
                           f"{r.max_abs_diff['baseline'] / r.max_abs_score:.1e}"]
                          if "baseline" in r.seconds else ["-"] * 3)
            table.add_row(*cells)
        console = Console(width=240)
        console.print(table)
        peak = _in_fresh_process(matmul_peak_gflops)
        console.print(f"this machine's float32 matrix product (2048 x 2048 x 2048, best of 8): {peak:.0f} GFLOP/s")
        if ns.pairs and ns.baseline:
            import statistics

            for source in ns.data:
                timed = bench_pairs(ns.model, source, ns.baseline, ns.pairs, ns.n_steps)
                ratios = [old / new for old, new in timed]
                console.print(
                    f"{source}: {len(timed)} interleaved pairs (baseline, then fast; fresh processes), seconds per "
                    f"example: baseline {' '.join(f'{o:.2f}' for o, _ in timed)}, fast "
                    f"{' '.join(f'{n:.2f}' for _, n in timed)}; fast vs baseline per pair: median "
                    f"{statistics.median(ratios):.2f}x (min {min(ratios):.2f}x, max {max(ratios):.2f}x)")
        for r in rows:
            against = "baseline" if "baseline" in r.seconds else "full-stack"
            need = r.flops["fast"] / (r.seconds[against] / SPEED_GOAL) / 1e9
            console.print(f"{r.label}: {SPEED_GOAL}x the {against} path needs the fast path's "
                          f"{r.flops['fast'] / 1e9:.0f} GFLOP per example at {need:.0f} GFLOP/s, "
                          f"{need / peak:.0%} of that peak (it runs at {r.gflops() / peak:.0%}: "
                          f"{r.ratio(against):.2f}x)")


# --------------------------------------------------------------------------- serving


@dataclass
class LoadResult:
    label: str
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    latencies: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


SERVE_PROMPT = ("Context: As of 2023, India is the most populous country in the world.\n"
                "Question: Which country is the most populous in the world?\nAnswer:")


async def _load(label: str, call: Callable[[], Any], concurrency: int, requests: int,
                tokens_per_request: int) -> LoadResult:
    """``requests`` calls of ``call`` with at most ``concurrency`` in flight."""
    import asyncio

    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one() -> None:
        async with gate:
            t = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(requests)))
    return LoadResult(label, concurrency, requests, requests * tokens_per_request,
                      time.perf_counter() - t0, latencies)


async def _serve_runs(server: Any, label: str, levels: list[int], max_tokens: int) -> list[LoadResult]:
    """All load runs against one server, in one event loop (clients are bound to their loop)."""
    import openai

    from .langchain import ChatIrcan, IrcanLLM

    body = {"ignore_eos": True}  # every request generates exactly max_tokens tokens
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0)
    llm = IrcanLLM(model=server.model_name, base_url=server.base_url, max_tokens=max_tokens,
                   extra_body=body, max_retries=0)

    async def raw() -> Any:
        return await client.completions.create(model=server.model_name, prompt=SERVE_PROMPT,
                                               max_tokens=max_tokens, temperature=0, extra_body=body)

    async def wrapped() -> Any:
        return await llm.ainvoke(SERVE_PROMPT)

    chat = ChatIrcan(model=server.model_name, base_url=server.base_url, max_tokens=max_tokens,
                     extra_body=body, max_retries=0, timeout=300)

    async def streamed() -> Any:  # a streamed chat request through the wrapper, read to the end
        return [chunk async for chunk in chat.astream(SERVE_PROMPT)]

    results = []
    await _load("warm-up", raw, 8, 8, max_tokens)
    for c in levels:
        results.append(await _load(f"{label} raw", raw, c, max(8, 2 * c), max_tokens))
    if label == "IRCAN":
        for _ in range(2):  # interleaved, so drift hits both alike
            results.append(await _load("IRCAN raw (vs wrapper)", raw, 8, 32, max_tokens))
            results.append(await _load("IRCAN LangChain wrapper", wrapped, 8, 32, max_tokens))
        results.append(await _load("IRCAN ChatIrcan streams", streamed, 64, 128, max_tokens))
    await client.close()
    return results


def bench_serve(checkpoint: str, base: str, levels: list[int], max_tokens: int) -> list[LoadResult]:
    """Throughput and latency of the base and the patched checkpoint, raw client and LangChain wrapper."""
    import asyncio

    from .models import resolve_model
    from .serving import VLLMServer

    results: list[LoadResult] = []
    for label, folder, plain in (("base", resolve_model(base), True), ("IRCAN", checkpoint, False)):
        with VLLMServer(folder, require_manifest=not plain) as server:
            results += asyncio.run(_serve_runs(server, label, levels, max_tokens))
    return results


def print_serve(results: list[LoadResult], levels: list[int]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="vLLM serving, one run (completions, fixed output length)")
    for col in ("run", "concurrency", "requests", "tokens/s", "p50 latency s", "p95 latency s"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r.label, str(r.concurrency), str(r.requests), f"{r.tokens_per_s:.1f}",
                      f"{r.percentile(0.5):.2f}", f"{r.percentile(0.95):.2f}")
    console = Console(width=140)
    console.print(table)
    by = {(r.label, r.concurrency): r for r in results}
    for c in levels:
        ratio = by[("IRCAN raw", c)].tokens_per_s / by[("base raw", c)].tokens_per_s
        console.print(f"patched / base throughput at concurrency {c}: {ratio:.3f}")
    raw_s = sum(r.seconds for r in results if r.label == "IRCAN raw (vs wrapper)")
    wrap_s = sum(r.seconds for r in results if r.label == "IRCAN LangChain wrapper")
    console.print(f"LangChain wrapper overhead vs raw OpenAI client: {(wrap_s / raw_s - 1) * 100:+.1f}%")


# --------------------------------------------------------------------------- evaluation


def rag_examples(tokenizer: Any, n: int, n_tokens: int) -> list[ConflictExample]:
    """``n`` shipped conflicts, each with its context padded by other facts to about ``n_tokens``
    tokens (RAG-sized prompts; the agreeing context padded alike)."""
    from .data import _agreeing_context

    examples = load_examples("conflicts").examples
    facts = [e.context for e in examples if e.context]
    out = []
    for i in range(n):
        e = examples[i % len(examples)]
        context, j = e.context or "", i
        while len(tokenizer(QA_TEMPLATE.render(e.question or "", context))["input_ids"]) < n_tokens:
            context = facts[j % len(facts)] + " " + context
            j += 7
        agreeing = _agreeing_context(context, e.answer, e.memorized)
        out.append(e.model_copy(update={
            "id": f"rag-{i}", "context": context, "prompt": QA_TEMPLATE.render(e.question or "", context),
            "agreeing_context": agreeing,
            "agreeing_prompt": QA_TEMPLATE.render(e.question or "", agreeing) if agreeing else None}))
    return out


def bench_eval(model_spec: str, rows: int, max_new_tokens: int, grid_rows: int,
               grid_tokens: int = 250, score_rows: int = 200) -> dict[str, float]:
    """CAD with two KV-cached streams vs naive CAD (full re-run per token); then, on RAG prompts
    of ``grid_tokens`` tokens, one scoring pass over ``score_rows`` of them and a 4-point tuning
    grid on ``grid_rows``, each with last-position logits vs all positions. The grid is a sequence
    of such scoring passes, so the pass ratio is the grid's ratio at any size."""
    from unittest import mock

    from .attribution import attribute_examples
    from .config import SelectionConfig
    from .evaluation import metrics, tuning
    from .evaluation.decoding import greedy_generate, naive_cad_generate
    from .evaluation.tuning import tune
    from .models import load_model
    from .selection import select_neurons

    lm = load_model(model_spec)
    model, tok = lm.model, lm.tokenizer
    examples = load_examples("conflicts").examples
    test = examples[:rows]
    prompts, plain = [e.prompt for e in test], [e.prompt_without_context for e in test]
    greedy_generate(model, tok, prompts[:2], 2, cad_alpha=0.5, prompts_without_context=plain[:2])  # warm-up
    fast, fast_s, _ = timed(lambda: greedy_generate(model, tok, prompts, max_new_tokens, cad_alpha=0.5,
                                                    prompts_without_context=plain))
    naive, naive_s, _ = timed(lambda: naive_cad_generate(model, tok, prompts, plain, max_new_tokens, 0.5))

    rag_prompts = [e.prompt for e in rag_examples(tok, score_rows, grid_tokens)]
    dev = rag_examples(tok, grid_rows, grid_tokens)
    last, last_s, last_mib = timed(lambda: metrics.next_token_logits(model, tok, rag_prompts))
    full_fn = functools.partial(metrics.next_token_logits, all_positions=True)
    full, full_s, full_mib = timed(lambda: full_fn(model, tok, rag_prompts))
    neurons = select_neurons(attribute_examples(model, tok, examples[:8], progress=False),
                             SelectionConfig(num_neurons=4))
    grid = dict(hs=[1, 4], betas=[2.0], rules=("paper", "signed"), progress=False)
    result = tune(model, tok, neurons, dev, **grid)
    with mock.patch.object(metrics, "next_token_logits", full_fn), \
         mock.patch.object(tuning, "next_token_logits", full_fn):
        result_full = tune(model, tok, neurons, dev, **grid)
    same = [p.dev.accuracy for p in result.grid] == [p.dev.accuracy for p in result_full.grid]
    return {"rows": rows, "tokens": max_new_tokens, "cad_cached_s": fast_s, "cad_naive_s": naive_s,
            "same_output": float(fast == naive),
            "rag_rows": score_rows, "grid_rows": grid_rows, "rag_tokens": grid_tokens,
            "score_last_s": last_s, "score_all_s": full_s, "score_last_mib": last_mib, "score_all_mib": full_mib,
            "score_max_diff": float((last - full).abs().max()),
            "grid_points": len(result.grid), "grid_s": result.seconds, "grid_all_s": result_full.seconds,
            "grid_same": float(same)}
