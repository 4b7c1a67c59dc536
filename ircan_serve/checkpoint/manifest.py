"""``ircan.json``: what an exported checkpoint is, where it came from and how to check it.

Serving and the LangChain wrappers read only this module (model name, prompt template), so it
imports nothing heavier than pydantic.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from ..errors import IrcanError
from ..prompts import QA_TEMPLATE, PromptTemplate
from ..units import Unit

MANIFEST = "ircan.json"


class DatasetInfo(BaseModel):
    """Which data the units were found on."""

    source: str = Field(description="The data file as the recipe names it (relative to the recipe), "
                        "or 'conflicts' for the shipped set.")
    format: str
    n_examples: int
    sha256: str | None = None


class Manifest(BaseModel):
    """``ircan.json``: what this checkpoint is and how to check it."""

    format_version: int = 1
    base_model: str = Field(description="What the user named (smollm2, a folder, a hub id).")
    base_source: str = Field(description="The base model as the user named it (a name, a hub id, or the "
                             "folder as given), never a path of the machine that built the checkpoint.")
    model_type: str
    served_model_name: str
    neurons: list[Unit] = Field(description="The reweighted units (neurons or heads), each with its factor (scale).")
    beta: float
    rule: str = Field("paper", description="How beta became the units' factors (paper, signed).")
    selection: dict[str, Any] = Field(default_factory=dict)
    attribution: dict[str, Any] = Field(default_factory=dict)
    dataset: DatasetInfo | None = None
    prompt_template: PromptTemplate | None = Field(
        QA_TEMPLATE, description="How the RAG wrapper should put context and question together."
    )
    versions: dict[str, str] = Field(default_factory=dict)
    files: dict[str, str] = Field(description="weight file -> sha256")
    created_at: str = ""

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise IrcanError(
                f"{folder} is not an exported IRCAN checkpoint (no {MANIFEST}); "
                "create one with `ircan export`"
            )
        try:
            return cls.model_validate_json(path.read_text())
        except ValidationError as e:
            raise IrcanError(f"{path} is not a valid manifest:\n{e}") from e


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def eos_token_ids(folder: str | Path) -> list[int]:
    """The end-of-sequence token ids of the model in ``folder`` (its generation config, else its
    config); empty when neither says."""
    import json

    for name in ("generation_config.json", "config.json"):
        path = Path(folder) / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            if value is not None:
                return [int(v) for v in (value if isinstance(value, list) else [value])]
    return []
