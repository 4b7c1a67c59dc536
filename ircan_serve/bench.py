"""``ircan bench``: speed and memory measured as ratios within one run.

Benchmarks never assert timings (tests check behaviour); they print what they measured.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass
class AttributionBench:
    tokens: int
    layers: int
    fast_s: float
    reference_s: float
    fast_mib: float
    reference_mib: float
    max_abs_diff: float
    max_abs_score: float


def bench_attribution(model_spec: str, lengths: list[int], n_steps: int,
                      reference_layers: int | None) -> list[AttributionBench]:
    """Time fast and reference attribution on the same example and layers."""
    import torch

    from .attribution import ContextAwareIntegratedGradients
    from .config import AttributionConfig
    from .models import load_model

    lm = load_model(model_spec)
    ig = ContextAwareIntegratedGradients(lm.model, lm.tokenizer)
    rows = []
    for n in lengths:
        example = prompt_of_length(lm.tokenizer, n)
        n_tok = len(lm.tokenizer(example.prompt)["input_ids"])
        k = reference_layers or (ig.n_layers if n < 100 else 3)
        layers = torch.linspace(0, ig.n_layers - 1, k).round().long().unique().tolist()
        # Warm-up with the timed shapes: the first call of a shape pays for kernel selection.
        ig.attribute(example, AttributionConfig(method="fast", layers=layers, n_steps=n_steps))
        ig.attribute(example, AttributionConfig(method="reference", layers=layers[:1], n_steps=n_steps))
        fast, fast_s, fast_mib = timed(lambda: ig.attribute(
            example, AttributionConfig(method="fast", layers=layers, n_steps=n_steps)))
        ref, ref_s, ref_mib = timed(lambda: ig.attribute(
            example, AttributionConfig(method="reference", layers=layers, n_steps=n_steps)))
        rows.append(AttributionBench(
            tokens=n_tok, layers=len(layers), fast_s=fast_s, reference_s=ref_s,
            fast_mib=fast_mib, reference_mib=ref_mib,
            max_abs_diff=(fast.scores - ref.scores).abs().max().item(),
            max_abs_score=ref.scores.abs().max().item(),
        ))
    return rows


def run(ns: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    if ns.bench == "attribution":
        rows = bench_attribution(ns.model, ns.lengths, ns.n_steps, ns.reference_layers)
        table = Table(title=f"attribution, {ns.model}, m = {ns.n_steps} (one run)")
        for col in ("prompt tokens", "layers", "reference s", "fast s", "speed-up",
                    "reference peak MiB", "fast peak MiB", "max |diff| / max |score|"):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(str(r.tokens), str(r.layers), f"{r.reference_s:.2f}", f"{r.fast_s:.2f}",
                          f"{r.reference_s / r.fast_s:.1f}x", f"{r.reference_mib:.0f}",
                          f"{r.fast_mib:.0f}", f"{r.max_abs_diff / r.max_abs_score:.1e}")
        Console().print(table)
