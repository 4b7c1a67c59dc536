"""Reading a data file into examples, with the checks every row gets."""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import IrcanError
from ..prompts import PromptTemplate, encode
from .example import ConflictExample, DataError, LoadedData
from .formats import data_format, detect_format
from .parsers import renderer

log = logging.getLogger(__name__)

SHIPPED_SET = "conflicts"
"""The name of the hand-written conflict set that ships with the package."""

SHIPPED = {
    "conflicts": "conflicts.jsonl",
    "counterfact-smollm2": "counterfact-smollm2.json",
}
"""Data sets that ship with the package (``ircan_serve/datasets``, see its NOTICE.md): name -> file."""


def shipped_conflicts_path() -> Path:
    """The hand-written counterfactual QA set that ships with the package."""
    return data_path(SHIPPED_SET)


def data_path(source: str | Path) -> Path:
    """The file a data source names: a shipped data set's (:data:`SHIPPED`), or the path as given."""
    name = str(source)
    if name in SHIPPED:
        return Path(str(resources.files("ircan_serve") / "datasets" / SHIPPED[name]))
    return Path(source)


def read_rows(path: Path) -> list[tuple[str, Any]]:
    """(location, row) pairs; JSON lists are located by item, JSONL by line. A JSONL line that is
    not JSON becomes a :class:`DataError` in place of its row."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from e
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of rows")
        return [(f"{path}: item {i}", row) for i, row in enumerate(rows)]
    out: list[tuple[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((f"{path}:{lineno}", DataError(f"{path}:{lineno}: not valid JSON: {e.msg}")))
    return out


def _checked(example: ConflictExample, where: str, seen: set[str]) -> ConflictExample:
    if example.id in seen:
        raise DataError(f"{where}: duplicate id {example.id!r}")
    if example.answer.strip() == example.memorized.strip():
        raise DataError(f"{where}: answer equals the memorized answer")
    return example


def load_examples(
    source: str | Path,
    data_format_name: str = "auto",
    *,
    skip_invalid: bool = False,
    limit: int | None = None,
    template: PromptTemplate | None = None,
    tokenizer: Any = None,
) -> LoadedData:
    """Read conflict examples from a file, or the shipped set when ``source == 'conflicts'``.

    ``template`` is the recipe's RAG prompt (formats that take one; default: the format's own); a
    chat-mode template renders with ``tokenizer``'s chat template.

    Raises:
        DataError: a row is bad and ``skip_invalid`` is false, or no valid row is left.
    """
    path = data_path(source)
    if not path.is_file():
        raise IrcanError(f"data file {path} does not exist")
    name = detect_format(path) if data_format_name == "auto" else data_format_name
    fmt = data_format(name)
    if template is not None and not fmt.custom_template:
        raise IrcanError(f"{path}: a prompt template applies to generic and CounterFact data, not {name}")
    template = template or fmt.template
    render = renderer(template, tokenizer) if template is not None else None
    loaded = LoadedData(examples=[], template=template)
    seen: set[str] = set()
    for index, (where, row) in enumerate(read_rows(path)):
        if limit is not None and len(loaded.examples) >= limit:
            break
        try:
            if isinstance(row, DataError):
                raise row
            example = _checked(fmt.parser(row, where, index, template, render), where, seen)
        except DataError as e:
            if not skip_invalid:
                raise
            loaded.skipped.append(str(e))
            continue
        seen.add(example.id)
        loaded.examples.append(example)
    if not loaded.examples:
        raise DataError(f"{path}: no valid rows (format {name})")
    if loaded.skipped:
        log.warning("%s: %s", path, loaded.skip_summary())
    return loaded


def check_prompt_lengths(
    loaded: LoadedData, tokenizer: Any, max_tokens: int, *, skip_invalid: bool = False
) -> LoadedData:
    """Reject (or, with ``skip_invalid``, drop) examples whose prompt exceeds ``max_tokens``."""
    kept: list[ConflictExample] = []
    skipped = list(loaded.skipped)
    for ex in loaded.examples:
        n = len(encode(tokenizer, ex.prompt + ex.answer))
        if n > max_tokens:
            msg = f"{ex.source}: prompt longer than the model's context ({n} > {max_tokens} tokens)"
            if not skip_invalid:
                raise DataError(msg)
            skipped.append(msg)
            continue
        kept.append(ex)
    if not kept:
        raise DataError("no example fits in the model's context")
    return LoadedData(examples=kept, skipped=skipped, template=loaded.template)
