"""``ircan conflicts``: a conflict set from your own QA pairs (those the model answers closed-book)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .flags import print_summary

HELP = "build a conflict set from your own QA pairs (those the model answers closed-book)"
DESCRIPTION = ("Read JSONL QA pairs (question, answer, optional passage and kind), ask the model each question "
               "without context, keep the rows it answers, and write generic JSONL whose context states another "
               "answer of the same kind (in the passage, or one sentence), plus a report beside it (conflicts.jsonl: "
               "conflicts.report.json) with every dropped row and why.")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser("conflicts", help=HELP, description=DESCRIPTION)
    p.add_argument("input", help="JSONL with question, answer[, passage, kind, id]")
    p.add_argument("-o", "--output", required=True, help="conflict set to write (generic JSONL)")
    p.add_argument("--model", default="smollm2", help="folder, hub id, .gguf file or 'smollm2'")
    p.add_argument("--seed", type=int, default=0, help="seed of the answer substitution")
    p.add_argument("--chat", action="store_true",
                   help="ask the closed-book questions through the model's chat template (instruct "
                        "models; SmolLM2-Instruct ends its turn at once after a bare 'Answer:')")
    p.add_argument("--system", help="system message for --chat")
    return p


def run(ns: argparse.Namespace) -> None:
    from ..conflicts import build_conflicts
    from ..models import load_model
    from ..prompts import QA_TEMPLATE

    lm = load_model(ns.model)
    template = QA_TEMPLATE.model_copy(update={"chat": ns.chat, "system": ns.system})
    report = build_conflicts(lm.model, lm.tokenizer, ns.input, ns.output, template=template, seed=ns.seed)
    print_summary("conflicts", {
        "model": lm.name, "QA rows": report.rows, "conflicts written": report.written, "output": report.output,
        "dropped": ", ".join(f"{n} {r}" for r, n in report.dropped.items()) or "none",
        "report": str(Path(report.output).with_name(Path(report.output).stem + ".report.json"))})
