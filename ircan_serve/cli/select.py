"""``ircan select``: pick the context-aware units from an attribution store."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import IrcanError
from .flags import add_config_flags, config_from_flags, print_summary

HELP = "pick the context-aware neurons from an attribution store"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    from ..config import SelectionConfig

    p = sub.add_parser("select", help=HELP)
    p.add_argument("--store", required=True)
    p.add_argument("-o", "--output", help="neurons file (default STORE/neurons.json)")
    p.add_argument("--beta", type=float, help="record this beta in the neurons file")
    add_config_flags(p, SelectionConfig)
    return p


def run(ns: argparse.Namespace) -> None:
    from ..attribution import AttributionStore
    from ..config import SelectionConfig
    from ..selection import select_units

    config = config_from_flags(ns, SelectionConfig)
    records = AttributionStore(ns.store).all()
    if not records:
        raise IrcanError(f"{ns.store} holds no attribution results; run `ircan attribute` first")
    units = select_units(records, config)
    if ns.beta is not None:
        units = units.scaled(ns.beta, config.rule)
    output = Path(ns.output) if ns.output else Path(ns.store) / "neurons.json"
    units.save(output)
    print_summary("selection", {
        "examples": units.n_examples, "t / z / h": f"{config.threshold} / {config.top_z} / {config.num_neurons}",
        "neurons (layer:index x count)": ", ".join(f"{u.label}x{u.count}" for u in units.neurons),
        "scales": ", ".join(f"{f:g}" for f in units.scales()) if units.beta is not None else "(no --beta)",
        "written": output,
    })
