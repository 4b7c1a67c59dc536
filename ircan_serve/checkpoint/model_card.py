"""The model card (``README.md``) export writes into a checkpoint, as the Hugging Face Hub expects:
YAML front matter (base model, licence inherited from the base, tags) and what was changed, on
which data, by which rule, what was measured, and how to serve it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .manifest import Manifest

TAGS = ["ircan", "context-faithfulness", "knowledge-conflicts", "rag"]


def base_license(base_model: str, base_folder: Path) -> str:
    """The base model's licence: its own card's ``license:``, that of an embedded model, else
    ``other`` (the card then says to check the base model's terms)."""
    from ..models import EMBEDDED

    card = base_folder / "README.md"
    if card.is_file():
        found = re.search(r"^license:\s*(\S+)", card.read_text(errors="replace"), re.M)
        if found:
            return found.group(1).strip("\"'")
    return EMBEDDED[base_model].license if base_model in EMBEDDED else "other"


def _units_table(manifest: Manifest) -> list[str]:
    rows = ["| unit | layer | index | factor | found in (examples) | effect |", "| --- | --- | --- | --- | --- | --- |"]
    for u in manifest.neurons:
        factor = u.scale if u.scale is not None else manifest.beta
        effect = "-" if u.effect is None else f"{u.effect:+.3g}"
        rows.append(f"| {u.kind} | {u.layer} | {u.index} | x{factor:g} | {u.count} | {effect} |")
    return rows


def _evaluation(figures: dict[str, Any] | None) -> list[str]:
    if not figures:
        return ["Not evaluated when this checkpoint was exported: `ircan eval RECIPE` measures it on rows",
                "that attribution and tuning never read (95% intervals, McNemar against the original)."]
    lines = [f"Measured on {figures.get('rows', '?')} held-out rows ({figures.get('where', 'the recipe test split')}):", "",
             "| method | accuracy (follows the context) | 95% interval | vs original |", "| --- | --- | --- | --- |"]
    for row in figures.get("methods", []):
        ci = row.get("ci")
        interval = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"
        diff = row.get("difference")
        vs = f"{diff:+.3f} (p = {row['p_value']:.2g})" if diff is not None else "-"
        lines.append(f"| {row['method']} | {row['accuracy']:.3f} | {interval} | {vs} |")
    return lines


def model_card(manifest: Manifest, license_id: str, figures: dict[str, Any] | None = None) -> str:
    """The text of ``README.md`` for an exported checkpoint."""
    name = manifest.served_model_name
    data = manifest.dataset
    template = manifest.prompt_template
    front = ["---", f"base_model: {manifest.base_model}", f"license: {license_id}", "library_name: transformers",
             "pipeline_tag: text-generation", "tags:", *[f"- {t}" for t in TAGS], "---", ""]
    body = [
        f"# {name}", "",
        f"`{manifest.base_model}` with {len(manifest.neurons)} unit(s) reweighted by IRCAN (NeurIPS 2024, "
        "arXiv 2406.18406) so that it follows the context it is given more often. Only the listed slices of "
        "the output projections differ from the base model; every other weight is bit-identical "
        "(`ircan verify` checks both against `ircan.json`).", "",
        "## What was changed", "", *_units_table(manifest), "",
        f"Rule: `{manifest.rule}` (beta = {manifest.beta:g}); selection {manifest.selection}.",
        f"Attribution: {manifest.attribution or 'defaults'}.", "",
        "## Data", "",
        f"{data.n_examples} rows of `{data.source}` ({data.format}), sha256 {data.sha256}." if data else "Not recorded.",
        "", "## Measured", "", *_evaluation(figures), "",
        "## Prompt", "",
        f"With a context: `{template.with_context!r}`; chat template: {template.chat}." if template else "Not recorded.",
        "", "## Serve it", "", "```bash", f"ircan serve {name}            # vLLM on CPU or GPU, waits for /health",
        f"vllm serve ./{name}           # plain vLLM (GPU hosts): the checkpoint needs nothing else",
        "```", "",
        "```python", "from ircan_serve.langchain import IrcanLLM",
        f'llm = IrcanLLM.from_checkpoint("{name}", base_url="http://127.0.0.1:8000/v1")',
        'llm.invoke("Which country is the most populous?", context="As of 2023, India is the most populous country.")',
        "```", "",
        f"Licence: inherited from the base model ({license_id}); its terms apply to this checkpoint.", "",
    ]
    return "\n".join(front + body)
