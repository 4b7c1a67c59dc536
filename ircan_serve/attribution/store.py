"""Attribution results on disk, one safetensors file per example and unit kind, written as computed.

Layout: ``DIR/header.json`` (model, data, settings, example ids) and
``DIR/examples/<hash>.safetensors`` (float32 scores and activations; id, answer token and
probabilities in the metadata). Each file is written to a temporary name and renamed, so a killed
run leaves only complete records and resumes after them. Paths in the header are as the user
gave them (relative to where the recipe or command ran), so a store resumes after its project
folder moves.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import AttributionConfig
from ..data import ConflictExample
from ..errors import IrcanError
from ..files import atomic_path, atomic_write_json
from ..units import UNIT_KINDS
from .result import Attribution

log = logging.getLogger(__name__)

STORE_VERSION = 2
"""Version 2 stores the with/without-context activations beside the scores (the signed rule needs them)."""

_SETTINGS_DEFAULTS: dict[str, Any] = {"quadrature": "riemann", "units": ["neuron"], "baseline": "no-context"}
"""Attribution settings that stores written before them lack, with the value those stores used."""


def _normalized(header: dict[str, Any]) -> dict[str, Any]:
    """A header as this version writes it: settings older stores lack get the value they used,
    and the batch size, which older stores recorded but which does not change the scores, goes."""
    settings = {**_SETTINGS_DEFAULTS, **header.get("attribution", {})}
    settings.pop("internal_batch_size", None)
    return {**header, "attribution": settings}


class AttributionStore:
    """Attribution results on disk (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def header_path(self) -> Path:
        return self.path / "header.json"

    def _file(self, example_id: str, kind: str = "neuron") -> Path:
        key = example_id if kind == "neuron" else f"{example_id}\0{kind}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        return self.path / "examples" / f"{digest}.safetensors"

    def open(self, header: dict[str, Any]) -> None:
        """Create the store, or check that an existing one was made with the same settings."""
        header = _normalized({**header, "store_version": STORE_VERSION})
        if self.header_path.is_file():
            existing = _normalized(json.loads(self.header_path.read_text()))
            if existing.get("store_version", 1) != STORE_VERSION:
                raise IrcanError(
                    f"attribution store {self.path} is version {existing.get('store_version', 1)} "
                    f"(this ircan-serve writes version {STORE_VERSION}, which adds the activations "
                    "the signed rule needs); it can still be read by `ircan select --rule paper`, "
                    "but to resume or extend it, attribute into a new folder"
                )
            _check_same_settings(self.path, existing, header)
            return
        (self.path / "examples").mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.header_path, header)

    def header(self) -> dict[str, Any]:
        if not self.header_path.is_file():
            raise IrcanError(f"{self.path} is not an attribution store (no header.json)")
        return _normalized(json.loads(self.header_path.read_text()))

    def has(self, example_id: str, kind: str = "neuron") -> bool:
        return self._file(example_id, kind).is_file()

    def put(self, attribution: Attribution) -> None:
        from safetensors.torch import save_file

        meta = {
            "example_id": attribution.example_id,
            "answer_token": str(attribution.answer_token),
            "prob_with_context": repr(attribution.prob_with_context),
            "prob_without_context": repr(attribution.prob_without_context),
            "kind": attribution.kind,
            "width": str(attribution.width),
        }
        tensors = {"scores": attribution.scores.contiguous()}
        if attribution.activations_with is not None and attribution.activations_without is not None:
            tensors["activations_with"] = attribution.activations_with.contiguous()
            tensors["activations_without"] = attribution.activations_without.contiguous()
        with atomic_path(self._file(attribution.example_id, attribution.kind)) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    def get(self, example_id: str, kind: str = "neuron") -> Attribution:
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        path = self._file(example_id, kind)
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
            tensors = load_file(str(path))
            return Attribution(
                example_id=meta["example_id"],
                answer_token=int(meta["answer_token"]),
                scores=tensors["scores"],
                prob_with_context=float(meta["prob_with_context"]),
                prob_without_context=float(meta["prob_without_context"]),
                activations_with=tensors.get("activations_with"),
                activations_without=tensors.get("activations_without"),
                kind=meta.get("kind", "neuron"),
                width=int(meta.get("width", "1")),
            )
        except (OSError, KeyError, ValueError, TypeError, SafetensorError) as e:
            raise IrcanError(f"attribution record {path} (example {example_id!r}) is unreadable: {e}; "
                             "delete it and rerun `ircan attribute` to recompute it") from e

    def all(self, kind: str | None = None) -> list[Attribution]:
        """Every stored record of ``kind`` (default: of every kind, neurons first), in the order of
        the header's example ids."""
        ids = self.header().get("example_ids", [])
        kinds = [kind] if kind is not None else list(UNIT_KINDS)
        return [self.get(i, k) for k in kinds for i in ids if self.has(i, k)]


def _check_same_settings(path: Path, existing: dict[str, Any], header: dict[str, Any]) -> None:
    if existing == header:
        return
    diff = {k: (existing.get(k), v) for k, v in header.items() if existing.get(k) != v}
    old, new = existing.get("attribution", {}), header.get("attribution", {})
    if old.get("quadrature") != new.get("quadrature") or old.get("n_steps") != new.get("n_steps"):
        raise IrcanError(
            f"attribution store {path} was made with other settings: --quadrature {old.get('quadrature')} "
            f"--n-steps {old.get('n_steps')}, not --quadrature {new.get('quadrature')} --n-steps "
            f"{new.get('n_steps')}; its scores would mix two approximations of the integral. Resume with the "
            "store's settings, or attribute into another folder")
    raise IrcanError(f"attribution store {path} was made with other settings {diff}; "
                     "use another folder or delete it")


def examples_to_do(examples: Sequence[ConflictExample], config: AttributionConfig,
                   store: AttributionStore | None, header: dict[str, Any] | None) -> list[ConflictExample]:
    """Open ``store`` for this run (or check it was made with the same settings) and return the
    examples it does not hold yet: all of them without a store."""
    if store is None:
        return list(examples)
    store.open({**(header or {}), "attribution": config.model_dump(), "example_ids": [e.id for e in examples]})
    todo = [e for e in examples if not all(store.has(e.id, kind) for kind in config.units)]
    if len(todo) < len(examples):
        log.info("resuming: %d of %d examples already attributed", len(examples) - len(todo), len(examples))
    return todo
