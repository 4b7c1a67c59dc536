"""``ircan bench ray``: attribution in one process against N Ray workers on the same rows."""

from __future__ import annotations

import time
from typing import Any


def bench_ray(model_spec: str, rows: int, workers: int, n_steps: int) -> dict[str, Any]:
    """One process (every core) vs ``workers`` Ray actors (cores split between them) on the same
    shipped rows. Ray's start-up is timed apart; the Ray run includes its workers' model loads."""
    import ray
    import torch

    from ..attribution import attribute_examples
    from ..attribution.ray import attribute_on_ray, init_ray
    from ..config import AttributionConfig, SelectionConfig
    from ..data import load_examples
    from ..models import load_model
    from ..selection import select_units

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
        return [(u.layer, u.index, u.count) for u in select_units(records, selection).neurons]

    return {
        "rows": len(examples), "workers": workers, "one_s": one_s, "ray_s": ray_s, "init_s": init_s,
        "max_rel_diff": max(float((a.scores - b.scores).abs().max() / b.scores.abs().max())
                            for a, b in zip(one, many)),
        "bitwise": all(torch.equal(a.scores, b.scores) for a, b in zip(one, many)),
        "same_neurons": ranked(one) == ranked(many),
    }


def add_arguments(b: Any) -> None:
    b.add_argument("--model", default="smollm2")
    b.add_argument("--rows", type=int, default=24, help="shipped conflict rows")
    b.add_argument("--workers", type=int, default=2)
    b.add_argument("--n-steps", type=int, default=20)


def main(ns: Any) -> None:
    from rich.console import Console

    r = bench_ray(ns.model, ns.rows, ns.workers, ns.n_steps)
    Console(width=160).print(
        f"attribution of {r['rows']} shipped rows, {ns.model}, one run: 1 process {r['one_s']:.1f} s, "
        f"{r['workers']} Ray workers {r['ray_s']:.1f} s (their model loads included; Ray start-up "
        f"{r['init_s']:.1f} s apart): {r['one_s'] / r['ray_s']:.2f}x. Scores: max |diff| / max |score| "
        f"{r['max_rel_diff']:.1e} (bit-identical: {r['bitwise']}); same top-10 neurons and counts: {r['same_neurons']}")
