"""ircan-serve: make RAG models trust their retrieved context (IRCAN, NeurIPS 2024).

The offline stage finds context-aware neurons and exports a patched checkpoint; serving runs it
behind vLLM's OpenAI server; the LangChain wrappers plug it into RAG chains. Heavy modules
(torch, transformers, vLLM) load lazily, so ``import ircan_serve`` and ``ircan --help`` are fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "IrcanError": "errors",
    "AttributionConfig": "config",
    "SelectionConfig": "config",
    "Recipe": "config",
    "load_recipe": "config",
    "ARCHITECTURES": "architectures",
    "ArchitectureLayout": "architectures",
    "layout_for": "architectures",
    "UNIT_KINDS": "units",
    "Unit": "units",
    "load_model": "models",
    "resolve_model": "models",
    "ConflictExample": "data",
    "PromptTemplate": "prompts",
    "load_examples": "data",
    "Attribution": "attribution",
    "AttributionStore": "attribution",
    "ContextAwareIntegratedGradients": "attribution",
    "attribute_examples": "attribution",
    "UnitSet": "units",
    "select_units": "selection",
    "reweighted": "reweight",
    "apply_reweighting": "reweight",
    "export_checkpoint": "checkpoint.export",
    "verify_checkpoint": "checkpoint.verify",
    "Manifest": "checkpoint.manifest",
    "find_context_neurons": "pipeline",
    "run_recipe": "pipeline",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'ircan_serve' has no attribute {name!r}")
