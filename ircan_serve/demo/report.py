"""The demo's tables: per recipe and setting, each served method's rate with its 95% interval and
McNemar's paired test against the original and against the instruction (:mod:`ircan_serve.demo`)."""

from __future__ import annotations

from typing import Any

from ..evaluation.stats import mcnemar, wilson_interval
from .run import METHODS, SETTINGS, DemoRow, DemoSet

BASELINES = ("original", "instruction")
"""What every method is tested against: what users have without us, and the free prompt fix."""
STACKED = {"IRCAN+CAD": "CAD"}
"""Methods also tested against what they stack on (IRCAN + CAD: at least CAD's rate?)."""


def _rate(values: list[bool]) -> dict[str, Any]:
    k, n = sum(values), len(values)
    return {"k": k, "n": n, "rate": k / n if n else 0.0, "ci": wilson_interval(k, n)}


def _paired(rows: list[DemoRow], metric: Any, a: str, b: str) -> dict[str, Any] | None:
    pairs = [(metric(r, a), metric(r, b)) for r in rows if a in r.answers and b in r.answers]
    if not pairs or a == b:
        return None
    return mcnemar([x for x, _ in pairs], [y for _, y in pairs]).model_dump()


def summarize_setting(rows: list[DemoRow], relevant: bool = True) -> dict[str, Any]:
    """Per method: the rate of the setting's goal (following a relevant context; keeping the
    memorized answer with an irrelevant one), the memorized rate, and the paired tests on the rows
    both methods answered."""
    goal = DemoRow.follows if relevant else DemoRow.stubborn
    out: dict[str, Any] = {"goal": "follows the context" if relevant else "keeps its own answer",
                           "questions": len(rows), "methods": {}}
    own = [r.own_document for r in rows if r.own_document is not None]
    if own:
        out["own_document"] = _rate(own)
    for m in METHODS:
        answered = [r for r in rows if m in r.answers]
        if not answered:
            continue
        entry: dict[str, Any] = {"goal": _rate([goal(r, m) for r in answered]),
                 "memorized": _rate([r.stubborn(m) for r in answered])}
        for base in (*BASELINES, *([STACKED[m]] if m in STACKED else [])):
            entry[f"vs {base}"] = _paired(answered, goal, base, m)
        out["methods"][m] = entry
    # each question's outcome per method ("1": the goal, "0": not, "-": not asked), for other paired tests
    out["outcomes"] = {"ids": [r.example.id for r in rows],
                       **{m: "".join("-" if m not in r.answers else "1" if goal(r, m) else "0" for r in rows)
                          for m in out["methods"]}}
    return out


def summarize_set(s: DemoSet) -> dict[str, Any]:
    """Every setting's summary, and the side checks (locality, agreeing) with their paired test."""
    out: dict[str, Any] = {"name": s.name, "questions": len(s.questions), "documents": len(s.documents),
                           "settings": {name: summarize_setting(rows, SETTINGS[name].relevant if name in SETTINGS
                                                                else True)
                                        for name, rows in s.settings.items()}}
    for metric, fn in (("locality", DemoRow.locality_ok), ("agreeing", DemoRow.agreeing_ok)):
        per: dict[str, Any] = {}
        for m in ("original", "IRCAN"):
            values = [v for v in (fn(r, m) for r in s.rows) if v is not None]
            if values:
                per[m] = _rate(values)
        if len(per) == 2:
            pairs = [(fn(r, "original"), fn(r, "IRCAN")) for r in s.rows]
            kept = [(a, b) for a, b in pairs if a is not None and b is not None]
            per["mcnemar"] = mcnemar([a for a, _ in kept], [b for _, b in kept]).model_dump()
        out[metric] = per
    return out


def _test_cell(t: dict[str, Any] | None) -> str:
    return "" if t is None else f"{t['difference']:+.3f} (p = {t['p_value']:.2g})"


def print_summary(console: Any, s: DemoSet, summary: dict[str, Any]) -> None:
    """One table per setting: methods as rows."""
    from rich.table import Table

    for name, setting in summary["settings"].items():
        own = setting.get("own_document")
        found = f"; own document retrieved for {own['k']}/{own['n']}" if own else ""
        description = SETTINGS[name].description if name in SETTINGS else name
        table = Table(title=f"{s.name}, {name}: {description} ({setting['questions']} held-out questions, "
                      f"served by vLLM through the LangChain wrapper{found})")
        for col in ("method", setting["goal"], "Δ vs original", "Δ vs instruction", "memorized answer"):
            table.add_column(col)
        for m, e in setting["methods"].items():
            g, mem = e["goal"], e["memorized"]
            table.add_row(m, f"{g['k']}/{g['n']} = {g['rate']:.3f} [{g['ci'][0]:.3f}, {g['ci'][1]:.3f}]",
                          _test_cell(e["vs original"]), _test_cell(e["vs instruction"]),
                          f"{mem['rate']:.3f}")
        console.print(table)
        for m, base in STACKED.items():
            t = setting["methods"].get(m, {}).get(f"vs {base}")
            if t:
                console.print(f"  {m} vs {base} on the same questions: {_test_cell(t)}")
    for metric, label in (("locality", "locality facts (no context)"), ("agreeing", "agreeing contexts")):
        per = summary.get(metric) or {}
        parts = [f"{m} {v['k']}/{v['n']} = {v['rate']:.3f}" for m, v in per.items() if m != "mcnemar"]
        t = per.get("mcnemar")
        if parts:
            console.print(f"  {label}: " + ", ".join(parts) + (f"; {_test_cell(t)}" if t else ""))


def print_questions(console: Any, s: DemoSet) -> None:
    """A side-by-side table of the first setting's questions, original vs IRCAN (small sets)."""
    from rich.table import Table

    def cell(row: DemoRow, model: str) -> str:
        mark = "[green]✓[/]" if row.follows(model) else ("[red]✗ memorized[/]" if row.stubborn(model) else "[yellow]·[/]")
        return f"{row.answers[model]}  {mark}"

    table = Table(title=f"{s.name}: held-out questions, original vs IRCAN", show_lines=True)
    for col in ("question", "context", "original", "IRCAN"):
        table.add_column(col, overflow="fold")
    for r in s.rows:
        table.add_row(r.example.question or "", r.context, cell(r, "original"), cell(r, "IRCAN"))
    console.print(table)


def print_demo(sets: list[DemoSet], table_limit: int = 30) -> list[dict[str, Any]]:
    """For small sets a side-by-side table; for every set and setting the rates with intervals and
    p-values. Returns the summaries (written to JSON by ``ircan demo``)."""
    from rich.console import Console

    console = Console(width=170)
    summaries = []
    for s in sets:
        if len(s.rows) <= table_limit:
            print_questions(console, s)
        summary = summarize_set(s)
        print_summary(console, s, summary)
        summaries.append(summary)
    return summaries
