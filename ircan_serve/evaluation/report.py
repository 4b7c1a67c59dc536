"""The evaluation report: a Markdown table and plots next to ``results.json``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from .metrics import SIDE_CHECKS
from .runner import summarize


def _cell(row: dict[str, Any], metric: str) -> str:
    acc = row.get(f"{metric}.accuracy")
    if acc is None:
        return "–"
    std = row.get(f"{metric}.accuracy.std")
    stub = row[f"{metric}.stubbornness"]
    sstd = row.get(f"{metric}.stubbornness.std")
    ci = row.get(f"{metric}.accuracy.ci")
    acc_s = f"{acc:.3f}" + (f" ± {std:.3f}" if std is not None else "") + (
        f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and std is None else "")
    pv = row.get(f"{metric}.p_value")
    if pv is not None:
        acc_s += f" (Δ {row[f'{metric}.difference']:+.3f}, p = {pv:.2g})"
    stub_s = f"{stub:.3f}" + (f" ± {sstd:.3f}" if sstd is not None else "")
    return f"{acc_s} / {stub_s}"


def markdown(data: dict[str, Any], title: str) -> str:
    """The results table (accuracy / stubbornness), and the side effects."""
    rows = summarize(data)
    has_gen = any(r.get("generation.accuracy") is not None for r in rows)
    n = data["methods"][0]["first_token"]["n"] if data["methods"] else 0
    first_label = "option letters" if not has_gen else "first token"
    lines = [f"### {title} ({n} test rows)", ""]
    head = f"| method | {first_label}: accuracy / stubbornness |" + (" generation: accuracy / stubbornness |" if has_gen else "")
    lines += [head, "| --- | --- |" + (" --- |" if has_gen else "")]
    for r in rows:
        name = r["method"] + (f" ({r['seeds']} seeds)" if r["seeds"] > 1 else "")
        lines.append(f"| {name} | {_cell(r, 'first_token')} |" + (f" {_cell(r, 'generation')} |" if has_gen else ""))
    names = [m for m in SIDE_CHECKS if any(r.get(f"{m}.accuracy") is not None for r in rows)]
    checks = [r for r in rows if any(r.get(f"{m}.accuracy") is not None for m in names)]
    if checks:
        lines += ["", "Side checks (first token; must not drop): "
                  + "; ".join(f"{m}: {SIDE_CHECKS[m].description}" for m in names) + ".", "",
                  "| method | " + " | ".join(f"{m} accuracy" for m in names) + " |",
                  "| --- |" + " --- |" * len(names)]
        for r in checks:
            cells = []
            for m in names:
                acc, ci = r.get(f"{m}.accuracy"), r.get(f"{m}.accuracy.ci")
                cells.append("–" if acc is None else f"{acc:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
            lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    fx = data.get("side_effects")
    if fx:
        lines += ["", f"Side effects of IRCAN on the same rows without context: top-1 agreement with the "
                  f"original {fx['top1_agreement']:.3f}, mean KL {fx['kl']:.4f}; on the {fx['known']} rows "
                  f"whose memorized answer the original predicts, the patched model still predicts "
                  f"{fx['known_accuracy_patched']:.3f} of them."]
    return "\n".join(lines) + "\n"


def plots(data: dict[str, Any], out: Path, neurons: list[dict[str, Any]] | None,
          tune_grid: dict[str, Any] | None, n_layers: int) -> list[Path]:
    """Layer distribution of the found neurons, accuracy vs beta and vs h (dev), ablation bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if neurons:
        counts = Counter(n["layer"] for n in neurons)
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.bar(range(n_layers), [counts.get(i, 0) for i in range(n_layers)], color="tab:blue")
        ax.set(xlabel="layer", ylabel="neurons", title=f"layers of the top {len(neurons)} context-aware neurons")
        fig.tight_layout()
        written.append(out / "neuron_layers.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    if tune_grid and tune_grid.get("best"):
        best, grid = tune_grid["best"], tune_grid["grid"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
        rules = sorted({p.get("rule", "paper") for p in grid})
        for ax, key, fixed, label in ((axes[0], "beta", ("h", best["h"]), "β"), (axes[1], "h", ("beta", best["beta"]), "h")):
            for rule in rules:  # one line per reweighting rule, collapsed points in red
                pts = sorted((p[key], p["dev"]["accuracy"], p["collapsed"]) for p in grid
                             if p[fixed[0]] == fixed[1] and p.get("rule", "paper") == rule)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"dev accuracy, {rule}",
                        ls="-" if rule == "paper" else "--")
                ax.scatter([p[0] for p in pts if p[2]], [p[1] for p in pts if p[2]], color="red", zorder=3)
            ax.axhline(tune_grid["original"]["accuracy"], color="gray", ls=":", label="original")
            ax.scatter([], [], color="red", label="collapsed")
            ax.set(xlabel=label, ylabel="dev accuracy",
                   title=f"accuracy vs {label} ({fixed[0]} = {fixed[1]:g}; chosen: {best.get('rule', 'paper')})")
            ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / "tuning.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    rows = {r["method"]: r for r in summarize(data)}
    names = [m for m in ("original", "ircan", "erase", "random-enhance", "random-erase") if m in rows]
    if names:
        metric = "generation" if rows[names[0]].get("generation.accuracy") is not None else "first_token"
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(names, [rows[m][f"{metric}.accuracy"] for m in names],
               yerr=[rows[m].get(f"{metric}.accuracy.std") or 0 for m in names], capsize=4,
               color=["gray", "tab:green", "tab:red", "tab:olive", "tab:orange"][: len(names)])
        ax.set(ylabel=f"accuracy ({metric.replace('_', ' ')})", title="ablations (test)")
        ax.tick_params(axis="x", rotation=15)
        fig.tight_layout()
        written.append(out / "ablations.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def write_report(data: dict[str, Any], out: Path, title: str, neurons: list[dict[str, Any]] | None = None,
                 tune_grid: dict[str, Any] | None = None, n_layers: int = 0) -> Path:
    """``report.md`` (table + plots) in ``out``."""
    md = markdown(data, title)
    images = plots(data, out, neurons, tune_grid, n_layers)
    md += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in images) + "\n"
    (out / "report.md").write_text(md)
    (out / "summary.json").write_text(json.dumps(summarize(data), indent=2))
    return out / "report.md"
