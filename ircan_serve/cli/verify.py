"""``ircan verify``: check an exported checkpoint's hashes and patched slices."""

from __future__ import annotations

import argparse

from .flags import print_summary

HELP = "check an exported checkpoint's hashes and patched columns"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser("verify", help=HELP)
    p.add_argument("dir")
    p.add_argument("--base", help="base model to compare against (e.g. smollm2)")
    return p


def run(ns: argparse.Namespace) -> None:
    from ..checkpoint.verify import verify_checkpoint

    report = verify_checkpoint(ns.dir, base=ns.base)
    print_summary(f"verify {ns.dir}", {
        "weight files hashed": report.files_checked,
        "tensors compared with base": report.tensors_compared if ns.base else "(no --base)",
        "unit slices checked (columns)": report.columns_checked if ns.base else "(no --base)",
        "result": "OK" if report.ok else f"{len(report.problems)} problems",
    })
    for problem in report.problems:
        print("  -", problem)
    if not report.ok:
        raise SystemExit(1)
