"""Write a patched checkpoint: the base weights with each selected unit's slice scaled.

:func:`export_checkpoint` copies a Hugging Face folder (config, tokenizer, generation config,
chat template) and rewrites its safetensors files tensor by tensor, changing only the selected
slices of the output projections. Every other tensor is copied bit for bit, in its original
dtype and sharding. An ``ircan.json`` manifest records the provenance and the sha256 of every
weight file. The folder is built under a temporary name and renamed only when complete.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from ..errors import IrcanError
from ..prompts import QA_TEMPLATE, PromptTemplate
from ..units import UnitSet, unit_width, units_per_layer_of, weight_axis, weight_names
from .manifest import MANIFEST, DatasetInfo, Manifest, sha256_file
from .model_card import base_license, model_card

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("ircan-serve", "torch", "transformers", "safetensors"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def base_folder(source: str) -> Path:
    """A local folder for ``source``: itself, or the hub snapshot (from the cache when offline)."""
    path = Path(source)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source))
    except Exception as e:  # network, auth, missing repo: all mean "no local copy"
        raise IrcanError(f"could not get the files of {source!r}: {e}") from e


def _check_weights_format(base: Path) -> None:
    if list(base.glob("*.safetensors")):
        return
    bins = sorted(p.name for p in base.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    found = f"only {', '.join(bins[:3])}{' ...' if len(bins) > 3 else ''}" if bins else "no weights"
    raise IrcanError(
        f"{base} has {found}: export reads and writes safetensors only (pickled .bin files can run "
        "code when loaded). Convert it once: python -c \"from transformers import AutoModelForCausalLM; "
        f"AutoModelForCausalLM.from_pretrained('{base}', dtype='auto').save_pretrained('{base}-safetensors')\""
    )


def check_units(units: UnitSet, config: Any, where: str) -> None:
    """Every unit names a layer and an index the model has, of a kind its architecture has."""
    n_layers = config.num_hidden_layers
    for u in units.neurons:
        if u.layer >= n_layers:
            raise IrcanError(f"{where}: unit {u.label} names layer {u.layer}; the model has {n_layers}")
        per_layer = units_per_layer_of(config, u.kind)
        if u.index >= per_layer:
            raise IrcanError(f"{where}: {u.kind} {u.label} is out of range: the model has {per_layer} "
                             f"{u.kind}s per layer (indices 0..{per_layer - 1})")


def _check_inputs(base: Path, units: UnitSet, beta: float | None, output: Path, force: bool) -> Any:
    from transformers import AutoConfig

    if beta is not None and beta < 0:
        raise IrcanError(f"beta must be >= 0, got {beta}")
    if not units.neurons:
        raise IrcanError("the unit set is empty: nothing to reweight")
    if output.exists() and not force:
        raise IrcanError(f"{output} already exists; pass --force to replace it")
    if output.resolve() == base.resolve():
        raise IrcanError("the output folder is the base model's folder; choose another")
    _check_weights_format(base)
    config = AutoConfig.from_pretrained(base)
    check_units(units, config, "the neuron file")
    return config


def slice_targets(units: UnitSet, config: Any) -> dict[str, tuple[list[int], list[float], int]]:
    """Weight tensor name (every name a checkpoint may use) -> (slice indices, factors, axis)."""
    from ..reweight import slice_factors

    kinds = {u.kind for u in units.neurons}
    widths: dict[str, int] = {kind: unit_width(config, kind) for kind in kinds}
    out = {}
    for (kind, layer), (idx, factors) in slice_factors(units, widths).items():
        for name in weight_names(config.model_type, kind, layer):
            out[name] = (idx, factors, weight_axis(config.model_type, kind))
    return out


def _write_weights(base: Path, tmp: Path, targets: dict[str, tuple[list[int], list[float], int]],
                   provenance: dict[str, str]) -> set[str]:
    """Copy every safetensors shard of ``base`` into ``tmp``, scaling the targeted slices;
    returns the tensor names that were scaled."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..reweight import scale_slices

    found: set[str] = set()
    for shard in sorted(base.glob("*.safetensors")):
        tensors = {}
        with safe_open(str(shard), "pt") as f:
            metadata = dict(f.metadata() or {})
            for name in f.keys():
                tensor = f.get_tensor(name)
                if name in targets:
                    idx, factors, axis = targets[name]
                    tensor = scale_slices(tensor, idx, factors, axis)
                    found.add(name)
                tensors[name] = tensor
        save_file(tensors, str(tmp / shard.name), metadata={**metadata, "format": "pt", **provenance})
    return found


def swap_in(tmp: Path, output: Path) -> None:
    """Put the finished ``tmp`` at ``output``. An existing ``output`` is first moved aside to
    ``.NAME.old`` and removed only after the new folder is in place; if the process dies between
    the two renames, the next export (or :func:`recover`) puts the old folder back."""
    if not output.exists():
        tmp.rename(output)
        return
    old = output.with_name(f".{output.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    output.rename(old)
    try:
        tmp.rename(output)
    except BaseException:
        old.rename(output)
        raise
    shutil.rmtree(old, ignore_errors=True)


def recover(output: Path) -> None:
    """Undo an export killed between its two renames: ``.NAME.old`` without ``NAME`` is the last
    complete checkpoint, so it goes back in place."""
    old = output.with_name(f".{output.name}.old")
    if old.is_dir() and not output.exists():
        log.warning("restoring %s from %s (an earlier export was interrupted)", output, old)
        old.rename(output)


def export_checkpoint(
    base_source: str,
    units: UnitSet,
    beta: float | None,
    output: str | Path,
    *,
    base_model: str | None = None,
    served_model_name: str | None = None,
    dataset: DatasetInfo | None = None,
    attribution: dict[str, Any] | None = None,
    prompt_template: PromptTemplate | None = QA_TEMPLATE,
    force: bool = False,
    figures: dict[str, Any] | None = None,
) -> Manifest:
    """Write the patched checkpoint of ``base_source`` to ``output`` and return its manifest.

    Args:
        base_source: a Hugging Face folder with safetensors weights, or a hub id.
        units: the units to scale (all of them; use ``units.top(h)`` to cut).
        beta: one factor for every unit (0 erases them), or None to use each unit's scale
            (a set from :meth:`UnitSet.scaled`, e.g. the signed rule).
        output: the checkpoint folder; never replaced unless ``force``.
        figures: what an evaluation measured, for the model card (``README.md``).
    """
    base = base_folder(base_source)
    output = Path(output)
    recover(output)
    config = _check_inputs(base, units, beta, output, force)
    if beta is not None:
        units = units.scaled(beta, "paper")
    beta = units.beta if units.beta is not None else max(units.scales())
    manifest = Manifest(
        base_model=base_model or base_source, base_source=base_model or str(base_source), model_type=config.model_type,
        served_model_name=served_model_name or output.name, neurons=units.neurons, beta=beta,
        rule=units.rule or "paper", selection=units.selection.model_dump(), attribution=attribution or {},
        dataset=dataset, prompt_template=prompt_template, versions=_versions(), files={},
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    card = model_card(manifest, base_license(manifest.base_model, base), figures)
    _build(base, output, units, config, manifest, card)
    log.info("exported %s (%d units, beta=%g)", output, len(units.neurons), beta)
    return manifest


def _build(base: Path, output: Path, units: UnitSet, config: Any, manifest: Manifest, card: str) -> None:
    """Write the folder under a temporary name, then swap it in; on any failure the temporary
    folder goes and an existing checkpoint at ``output`` stays as it was."""
    targets = slice_targets(units, config)
    provenance = {"ircan_beta": repr(manifest.beta), "ircan_rule": manifest.rule,
                  "ircan_units": json.dumps([[u.kind, u.layer, u.index, s] for u, s in zip(units.neurons, units.scales())])}
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise IrcanError(f"cannot create the checkpoint next to {output}: {e}; choose a writable folder") from e
    try:
        for item in base.iterdir():
            if item.is_file() and item.suffix not in _WEIGHT_SUFFIXES and item.name != MANIFEST:
                shutil.copy2(item, tmp / item.name)
        found = _write_weights(base, tmp, targets, provenance)
        wanted = {names[0]: set(names) for names in (weight_names(config.model_type, u.kind, u.layer)
                                                    for u in units.neurons)}
        missing = sorted(name for name, names in wanted.items() if not found & names)
        if missing:
            raise IrcanError(f"{base} has no tensors {missing}; is it a {config.model_type} model?")
        manifest.files = {p.name: sha256_file(p) for p in sorted(tmp.glob("*.safetensors"))}
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
        (tmp / "README.md").write_text(card)
        swap_in(tmp, output)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise IrcanError(f"could not write the checkpoint {output}: {e}. Nothing was changed"
                         + (": the existing checkpoint there is intact" if output.exists() else "")) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
