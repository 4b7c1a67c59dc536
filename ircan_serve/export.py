"""Write and verify a patched checkpoint: the base weights with beta-scaled neurons.

:func:`export_checkpoint` copies a Hugging Face folder (config, tokenizer, generation config,
chat template) and rewrites its safetensors files tensor by tensor, changing only the selected
slices of the FFN output projections. Every other tensor is copied bit for bit, in its original
dtype and sharding. An ``ircan.json`` manifest records the provenance and the sha256 of every
weight file. The folder is built under a temporary name and renamed only when complete.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import logging
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from .architectures import layout_for
from .data import QA_TEMPLATE, PromptTemplate
from .errors import IrcanError
from .selection import Neuron, NeuronSet

log = logging.getLogger(__name__)

MANIFEST = "ircan.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class DatasetInfo(BaseModel):
    """Which data the neurons were found on."""

    source: str
    format: str
    n_examples: int
    sha256: str | None = None


class Manifest(BaseModel):
    """``ircan.json``: what this checkpoint is and how to check it."""

    format_version: int = 1
    base_model: str = Field(description="What the user named (smollm2, a folder, a hub id).")
    base_source: str = Field(description="The folder or hub id the base weights came from.")
    model_type: str
    served_model_name: str
    neurons: list[Neuron] = Field(description="The reweighted neurons, each with its factor (scale).")
    beta: float
    rule: str = Field("paper", description="How beta became the neurons' factors (paper, signed).")
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
    def load(cls, folder: str | Path) -> "Manifest":
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


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("ircan-serve", "torch", "transformers", "safetensors"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
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


def _check_inputs(base: Path, neurons: NeuronSet, beta: float | None, output: Path, force: bool) -> Any:
    from transformers import AutoConfig

    if beta is not None and beta < 0:
        raise IrcanError(f"beta must be >= 0, got {beta}")
    if not neurons.neurons:
        raise IrcanError("the neuron set is empty: nothing to reweight")
    if output.exists() and not force:
        raise IrcanError(f"{output} already exists; pass --force to replace it")
    if output.resolve() == base.resolve():
        raise IrcanError("the output folder is the base model's folder; choose another")
    if not list(base.glob("*.safetensors")):
        bins = sorted(p.name for p in base.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        found = f"only {', '.join(bins[:3])}{' ...' if len(bins) > 3 else ''}" if bins else "no weights"
        raise IrcanError(
            f"{base} has {found}: export reads and writes safetensors only (pickled .bin files can run "
            "code when loaded). Convert it once: python -c \"from transformers import AutoModelForCausalLM; "
            f"AutoModelForCausalLM.from_pretrained('{base}', dtype='auto').save_pretrained('{base}-safetensors')\""
        )
    config = AutoConfig.from_pretrained(base)
    layout = layout_for(config.model_type)
    n_layers = config.num_hidden_layers
    for n in neurons.neurons:
        if n.layer >= n_layers:
            raise IrcanError(f"neuron {n.layer}:{n.index} names layer {n.layer}; the model has {n_layers}")
    return config, layout


def _swap_in(tmp: Path, output: Path) -> None:
    """Replace ``output`` by the finished ``tmp`` so that a failure at any step leaves either
    the old checkpoint or the new one, never a mix or nothing."""
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


def export_checkpoint(
    base_source: str,
    neurons: NeuronSet,
    beta: float | None,
    output: str | Path,
    *,
    base_model: str | None = None,
    served_model_name: str | None = None,
    dataset: DatasetInfo | None = None,
    attribution: dict[str, Any] | None = None,
    prompt_template: PromptTemplate | None = QA_TEMPLATE,
    force: bool = False,
) -> Manifest:
    """Write the patched checkpoint of ``base_source`` to ``output`` and return its manifest.

    Args:
        base_source: a Hugging Face folder with safetensors weights, or a hub id.
        neurons: the neurons to scale (all of them; use ``neurons.top(h)`` to cut).
        beta: one factor for every neuron (0 erases them), or None to use each neuron's scale
            (a set from :meth:`NeuronSet.scaled`, e.g. the signed rule).
        output: the checkpoint folder; never replaced unless ``force``.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .reweight import neuron_factors, scale_neurons

    base = base_folder(base_source)
    output = Path(output)
    config, layout = _check_inputs(base, neurons, beta, output, force)
    if beta is not None:
        neurons = neurons.scaled(beta, "paper")
    factors = neuron_factors(neurons)
    targets = {name: f for layer, f in factors.items() for name in layout.weight_names(layer)}
    wanted = {layout.weight_name(layer): layout.weight_names(layer) for layer in factors}
    beta = neurons.beta if neurons.beta is not None else max(neurons.scales())
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
        found: set[str] = set()
        provenance = {"ircan_beta": repr(beta), "ircan_rule": neurons.rule or "paper",
                      "ircan_neurons": json.dumps({layer: dict(zip(*f)) for layer, f in factors.items()})}
        for shard in sorted(base.glob("*.safetensors")):
            tensors: dict[str, torch.Tensor] = {}
            with safe_open(str(shard), "pt") as f:
                metadata = dict(f.metadata() or {})
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    if name in targets:
                        tensor = scale_neurons(tensor, *targets[name], layout.neuron_axis)
                        found.add(name)
                    tensors[name] = tensor
            save_file(tensors, str(tmp / shard.name), metadata={**metadata, "format": "pt", **provenance})
        missing = {name for name, names in wanted.items() if not found & set(names)}
        if missing:
            raise IrcanError(f"{base} has no tensors {sorted(missing)}; is it a {config.model_type} model?")
        manifest = Manifest(
            base_model=base_model or base_source,
            base_source=str(base_source),
            model_type=config.model_type,
            served_model_name=served_model_name or output.name,
            neurons=neurons.neurons,
            beta=beta,
            rule=neurons.rule or "paper",
            selection=neurons.selection.model_dump(),
            attribution=attribution or {},
            dataset=dataset,
            prompt_template=prompt_template,
            versions=_versions(),
            files={p.name: sha256_file(p) for p in sorted(tmp.glob("*.safetensors"))},
            created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
        _swap_in(tmp, output)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise IrcanError(f"could not write the checkpoint {output}: {e}. Nothing was changed"
                         + (": the existing checkpoint there is intact" if output.exists() else "")) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%d neurons, beta=%g)", output, len(neurons.neurons), beta)
    return manifest


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


def verify_checkpoint(folder: str | Path, base: str | None = None) -> VerifyReport:
    """Check the manifest's hashes and, with ``base``, that only the listed slices changed, each by
    its factor.

    Without ``base`` only the hashes are checked. With it, every tensor is compared to the base:
    the listed neurons must equal ``base * scale`` (computed as the export does) and everything
    else must be bit-identical.
    """
    from safetensors import safe_open

    from .models import resolve_model

    folder = Path(folder)
    manifest = Manifest.load(folder)
    report = VerifyReport(folder=str(folder), files_checked=0)
    for name, digest in manifest.files.items():
        path = folder / name
        if not path.is_file():
            report.problems.append(f"{name}: missing")
        elif sha256_file(path) != digest:
            report.problems.append(f"{name}: sha256 differs from the manifest")
        report.files_checked += 1
    extra = {p.name for p in folder.glob("*.safetensors")} - set(manifest.files)
    report.problems += [f"{name}: weight file not in the manifest" for name in sorted(extra)]
    if base is None or report.problems:
        return report

    from .reweight import neuron_factors

    base_dir = base_folder(resolve_model(base))
    layout = layout_for(manifest.model_type)
    neurons = NeuronSet(neurons=manifest.neurons, selection=manifest.selection or {}, n_examples=0,
                        beta=manifest.beta)  # a neuron without a scale (format 1) takes the beta
    targets = {name: f for layer, f in neuron_factors(neurons).items() for name in layout.weight_names(layer)}
    with ExitStack() as stack:
        base_tensors: dict[str, Any] = {}  # tensor name -> open handle of its base shard
        for shard in base_dir.glob("*.safetensors"):
            handle = stack.enter_context(safe_open(str(shard), "pt"))
            base_tensors.update({k: handle for k in handle.keys()})
        _compare_with_base(folder, manifest, base_tensors, targets, layout.neuron_axis, report)
    return report


def _compare_with_base(folder: Path, manifest: Manifest, base_tensors: dict[str, Any],
                       targets: dict[str, tuple[list[int], list[float]]], axis: int,
                       report: VerifyReport) -> None:
    import torch
    from safetensors import safe_open

    from .reweight import scale_neurons

    for name in manifest.files:
        with safe_open(str(folder / name), "pt") as f:
            for key in f.keys():
                patched = f.get_tensor(key)
                if key not in base_tensors:
                    report.problems.append(f"{key}: not in the base model")
                    continue
                original = base_tensors[key].get_tensor(key)
                expected = original
                if key in targets:
                    expected = scale_neurons(original, *targets[key], axis)
                    report.columns_checked += len(targets[key][0])
                report.tensors_compared += 1
                if patched.shape != expected.shape or patched.dtype != expected.dtype:
                    report.problems.append(f"{key}: shape or dtype differs from the base")
                elif not torch.equal(patched, expected):
                    diff = (patched.float() - expected.float()).abs().max().item()
                    what = "listed neurons are not base x beta" if key in targets else "differs from the base"
                    report.problems.append(f"{key}: {what} (max abs diff {diff:.3g})")
