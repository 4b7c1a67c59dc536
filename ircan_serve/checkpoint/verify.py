"""Check an exported checkpoint: its weights match the manifest's hashes and, against the base,
only the listed units' slices differ, each by exactly its factor."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from ..units import UnitSet
from .manifest import Manifest, sha256_file


class VerifyReport(BaseModel):
    """What :func:`verify_checkpoint` checked."""

    folder: str
    files_checked: int
    tensors_compared: int = 0
    columns_checked: int = 0
    problems: list[str] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_hashes(folder: Path, manifest: Manifest, report: VerifyReport) -> None:
    for name, digest in manifest.files.items():
        path = folder / name
        if not path.is_file():
            report.problems.append(f"{name}: missing")
        elif sha256_file(path) != digest:
            report.problems.append(f"{name}: sha256 differs from the manifest")
        report.files_checked += 1
    extra = {p.name for p in folder.glob("*.safetensors")} - set(manifest.files)
    report.problems += [f"{name}: weight file not in the manifest" for name in sorted(extra)]


def verify_checkpoint(folder: str | Path, base: str | None = None) -> VerifyReport:
    """Check the manifest's hashes and, with ``base``, that only the listed slices changed, each by
    its factor.

    Without ``base`` only the hashes are checked. With it, every tensor is compared to the base:
    the listed units must equal ``base * scale`` (computed as the export does) and everything
    else must be bit-identical.
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    from ..models import resolve_model
    from .export import base_folder, check_units, slice_targets

    folder = Path(folder)
    manifest = Manifest.load(folder)
    report = VerifyReport(folder=str(folder), files_checked=0)
    _check_hashes(folder, manifest, report)
    if base is None or report.problems:
        return report
    units = UnitSet(neurons=manifest.neurons, selection=manifest.selection or {}, n_examples=0,
                    beta=manifest.beta)  # a unit without a scale (format 1) takes the beta
    config = AutoConfig.from_pretrained(folder)
    check_units(units, config, f"{folder}/ircan.json")
    targets = slice_targets(units, config)
    with ExitStack() as stack:
        base_tensors: dict[str, Any] = {}  # tensor name -> open handle of its base shard
        for shard in base_folder(resolve_model(base)).glob("*.safetensors"):
            handle = stack.enter_context(safe_open(str(shard), "pt"))
            base_tensors.update({k: handle for k in handle.keys()})
        _compare_with_base(folder, manifest, base_tensors, targets, report)
    return report


def _compare_with_base(folder: Path, manifest: Manifest, base_tensors: dict[str, Any],
                       targets: dict[str, tuple[list[int], list[float], int]], report: VerifyReport) -> None:
    import torch
    from safetensors import safe_open

    from ..reweight import scale_slices

    for name in manifest.files:
        with safe_open(str(folder / name), "pt") as f:
            for key in f.keys():
                patched = f.get_tensor(key)
                if key not in base_tensors:
                    report.problems.append(f"{key}: not in the base model")
                    continue
                expected = base_tensors[key].get_tensor(key)
                if key in targets:
                    idx, factors, axis = targets[key]
                    expected = scale_slices(expected, idx, factors, axis)
                    report.columns_checked += len(idx)
                report.tensors_compared += 1
                if patched.shape != expected.shape or patched.dtype != expected.dtype:
                    report.problems.append(f"{key}: shape or dtype differs from the base")
                elif not torch.equal(patched, expected):
                    diff = (patched.float() - expected.float()).abs().max().item()
                    what = "listed units are not base x beta" if key in targets else "differs from the base"
                    report.problems.append(f"{key}: {what} (max abs diff {diff:.3g})")
