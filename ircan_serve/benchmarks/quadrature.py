"""``ircan bench quadrature``: how many integration points attribution needs.

Scores each example with every ``--settings`` quadrature (``riemann:20``, ``gauss-legendre:8``, ...)
on the fast path and compares them with a fine reference (``--reference``, default
``gauss-legendre:32``) and with the paper's setting (``riemann:20``): the largest score error
relative to the largest score, whether each example's top unit and how many of its top 20 stay
those of the paper's setting, then the units selected over all examples (per example >= t * max,
top z; the h most frequent). With ``--recipe`` the rows are the recipe's attribution rows and
the selection uses the recipe's t and z.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

PAPER = "riemann:20"


def parse_setting(text: str) -> tuple[str, int]:
    """``gauss-legendre:8`` -> ("gauss-legendre", 8)."""
    from ..errors import IrcanError

    name, _, n = text.rpartition(":")
    if name not in ("riemann", "gauss-legendre") or not n.isdigit() or int(n) < 1:
        raise IrcanError(f"quadrature setting {text!r}: write NAME:N with NAME riemann or gauss-legendre, N >= 1")
    return name, int(n)


@dataclass
class SettingResult:
    setting: str
    seconds: float = 0.0
    """Seconds per example (fast path, after a warm-up)."""
    max_rel_error: float = 0.0
    """Largest |score - reference| / max |reference| over the examples."""
    same_top1: int = 0
    top20_overlap: list[int] = field(default_factory=list)
    """Per example: how many of its top 20 are the paper setting's top 20."""
    selected: list[str] = field(default_factory=list)
    """The most frequent units (``layer:index``), most frequent first."""


def _score_all(lm: Any, examples: list[Any], settings: list[str], layers: list[int] | None,
               baseline: str = "no-context") -> dict[str, Any]:
    """setting -> (per-example scores, seconds per example)."""
    from tqdm.auto import tqdm

    from ..attribution import ContextAwareIntegratedGradients
    from ..config import AttributionConfig

    ig = ContextAwareIntegratedGradients(lm.model, lm.tokenizer)
    out = {}
    for setting in settings:
        name, n = parse_setting(setting)
        config = AttributionConfig(quadrature=name, n_steps=n, layers=layers, baseline=baseline)
        ig.attribute(examples[0], config)  # warm-up
        t0 = time.perf_counter()
        records = [ig.attribute(e, config) for e in tqdm(examples, desc=setting, unit="ex")]
        out[setting] = (records, (time.perf_counter() - t0) / len(examples))
    return out


def compare(lm: Any, examples: list[Any], settings: list[str], reference: str, threshold: float = 0.1,
            top_z: int = 20, top_h: int = 16, layers: list[int] | None = None,
            baseline: str = "no-context") -> list[SettingResult]:
    """Every setting against ``reference`` (scores) and against :data:`PAPER` (top units, selection),
    all on the path from ``baseline`` (a recipe's ``[attribution] baseline``)."""
    from ..config import SelectionConfig
    from ..selection import select_units

    wanted = list(dict.fromkeys([PAPER, *settings, reference]))
    scored = _score_all(lm, examples, wanted, layers, baseline)
    selection = SelectionConfig(threshold=threshold, top_z=top_z, num_neurons=top_h)
    paper_tops = [r.scores.flatten().topk(20).indices.tolist() for r in scored[PAPER][0]]
    results = []
    for setting in wanted:
        records, seconds = scored[setting]
        result = SettingResult(setting, seconds)
        for record, ref, paper_top in zip(records, scored[reference][0], paper_tops):
            scale = float(ref.scores.abs().max())
            result.max_rel_error = max(result.max_rel_error, float((record.scores - ref.scores).abs().max()) / scale)
            top = record.scores.flatten().topk(20).indices.tolist()
            result.same_top1 += int(top[0] == paper_top[0])
            result.top20_overlap.append(len(set(top) & set(paper_top)))
        result.selected = [u.label for u in select_units(records, selection).neurons]
        results.append(result)
    return results


def _rows(lm: Any, ns: Any) -> tuple[list[Any], float, int, str]:
    """(examples, t, z, baseline): the recipe's attribution rows, selection and path, or the --data rows."""
    from ..data import load_examples
    from .rows import file_and_rows

    if ns.recipe:
        from ..pipeline import read_recipe, recipe_data

        recipe = read_recipe(ns.recipe)
        rows = recipe_data(recipe, lm, progress=False).attribution[: ns.limit]
        return rows, recipe.selection.threshold, recipe.selection.top_z, recipe.attribution.baseline
    out = []
    for source in ns.data:
        path, k = file_and_rows(source)
        out += load_examples(path, limit=k, tokenizer=lm.tokenizer).examples
    return out, 0.1, 20, "no-context"


def add_arguments(b: Any) -> None:
    b.add_argument("--model", default="smollm2")
    b.add_argument("--data", nargs="*", default=["conflicts:8"], metavar="FILE[:K]",
                   help="rows to score: the first K of each file (default: 8 shipped conflicts)")
    b.add_argument("--recipe", help="score the recipe's attribution rows instead (and select with its t and z)")
    b.add_argument("--limit", type=int, help="with --recipe: only its first N attribution rows")
    b.add_argument("--settings", nargs="+", default=["gauss-legendre:4", "gauss-legendre:6", "gauss-legendre:8"],
                   help="quadratures to compare, NAME:N (riemann:20, the paper's, is always included)")
    b.add_argument("--reference", default="gauss-legendre:32", help="the fine quadrature the errors are taken against")
    b.add_argument("--top-h", type=int, default=16, help="how many selected units to compare")


def main(ns: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..models import load_model

    for setting in [*ns.settings, ns.reference]:
        parse_setting(setting)
    lm = load_model(ns.model)
    examples, threshold, top_z, baseline = _rows(lm, ns)
    results = compare(lm, examples, ns.settings, ns.reference, threshold, top_z, ns.top_h, baseline=baseline)
    paper = next(r for r in results if r.setting == PAPER)
    table = Table(title=f"quadrature, {ns.model}, {len(examples)} examples, one run; errors against {ns.reference}, "
                        f"top units against {PAPER} (the paper's)")
    for col in ("setting", "s per example", "vs riemann:20", "max |err| / max |score|", "same top unit",
                "top-20 overlap: min / mean", f"same top-h selection (h = 1, 4, {ns.top_h})"):
        table.add_column(col, justify="right")
    for r in results:
        same = [r.selected[:h] == paper.selected[:h] for h in (1, 4, ns.top_h)]
        table.add_row(r.setting, f"{r.seconds:.2f}", f"{paper.seconds / r.seconds:.2f}x", f"{r.max_rel_error:.1e}",
                      f"{r.same_top1}/{len(examples)}",
                      f"{min(r.top20_overlap)} / {sum(r.top20_overlap) / len(r.top20_overlap):.1f}",
                      " ".join("yes" if x else "no" for x in same))
    console = Console(width=200)
    console.print(table)
    for r in results:
        console.print(f"{r.setting}: selected {', '.join(r.selected[:8])}")
