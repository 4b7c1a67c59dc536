"""``ircan known``: keep the rows of a data file that the model knows (the known-facts filter)."""

from __future__ import annotations

import argparse

from .flags import print_summary

HELP = "write the rows of a data file whose memorized answer the model gives without context"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    from ..data import FORMAT_CHOICES

    p = sub.add_parser("known", help=HELP)
    p.add_argument("input", help="data file (e.g. CounterFact's train split)")
    p.add_argument("-o", "--output", required=True, help="where to write the kept rows (same format)")
    p.add_argument("--model", default="smollm2", help="folder, hub id, .gguf file or an embedded model's name")
    p.add_argument("--format", default="auto", choices=FORMAT_CHOICES)
    return p


def run(ns: argparse.Namespace) -> None:
    from ..conflicts import write_known_rows
    from ..models import load_model

    lm = load_model(ns.model)
    report = write_known_rows(lm.model, lm.tokenizer, ns.input, ns.output, data_format=ns.format)
    print_summary("known facts", {"model": lm.name, "rows checked": report.checked, "kept": report.kept,
                                  "written": ns.output})
