"""``ircan attribute``: score units on a conflict data set into a resumable store."""

from __future__ import annotations

import argparse

from ..errors import IrcanError
from .flags import add_config_flags, add_model_flags, config_from_flags, print_summary

HELP = "score FFN neurons on a conflict data set (resumable)"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    from ..config import AttributionConfig
    from ..data import FORMAT_CHOICES

    p = sub.add_parser("attribute", help=HELP)
    add_model_flags(p)
    p.add_argument("--data", default="conflicts", help="data file or 'conflicts' (the shipped set)")
    p.add_argument("--format", default="auto", choices=FORMAT_CHOICES)
    p.add_argument("--store", required=True, help="attribution store folder (resumes if it exists)")
    p.add_argument("--limit", type=int, help="use only the first N rows")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad rows and report them")
    p.add_argument("--workers", type=int, default=1,
                   help="model replicas on Ray (one actor each, one GPU each on a GPU host); needs "
                        "the [ray] extra")
    p.add_argument("--address", help="join this Ray cluster (HOST:PORT, auto, ray://HOST:10001) "
                                     "instead of starting a local one")
    add_config_flags(p, AttributionConfig)
    return p


def run(ns: argparse.Namespace) -> None:
    from ..attribution import AttributionStore
    from ..config import AttributionConfig
    from ..models import load_model
    from ..pipeline import attribute_rows, load_checked_data, store_header

    config = config_from_flags(ns, AttributionConfig)
    if config.baseline == "irrelevant":
        raise IrcanError("--baseline irrelevant starts each path after the row's irrelevant documents, which only "
                         "a recipe's `contexts` mix builds: set [attribution] baseline = 'irrelevant' in a recipe "
                         "with contexts and run `ircan export RECIPE`")
    if ns.workers < 1:
        raise IrcanError(f"--workers must be at least 1, not {ns.workers}")
    if ns.address:
        from ..attribution.ray import check_address

        check_address(ns.address)  # before loading anything
    lm = load_model(ns.model, device=ns.device, dtype=ns.dtype)
    data = load_checked_data(lm, ns.data, ns.format, skip_invalid=ns.skip_invalid, limit=ns.limit)
    results = attribute_rows(lm, data.examples, config, AttributionStore(ns.store),
                             store_header(lm, ns.data, ns.format), workers=ns.workers, address=ns.address,
                             dtype=ns.dtype, device=ns.device)
    gain = sum(r.prob_with_context - r.prob_without_context for r in results) / len(results)
    ray = f"{ns.workers} (Ray{' at ' + ns.address if ns.address else ', local'})"
    print_summary("attribution", {
        "model": lm.name, "examples": len(results), "skipped rows": len(data.skipped) or "none",
        "method": config.method, "integration": f"{config.quadrature}, {config.n_steps} points", "store": ns.store,
        "workers": ray if ns.workers > 1 or ns.address else 1,
        "mean P(answer) gain from context": f"{gain:+.3f}",
    })
    if data.skipped:
        print(data.skip_summary())
