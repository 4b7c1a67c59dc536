"""Typed settings shared by the library, the CLI, recipe files and the export manifest.

Every default is the IRCAN paper's (NeurIPS 2024, arXiv 2406.18406, Section 3) unless the field
says otherwise. CLI flags and recipe keys are derived from these fields, so the field
descriptions are the documentation (``ircan attribute --help`` prints them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from .errors import IrcanError
from .prompts import PromptTemplate

Rule = Literal["paper", "signed"]
"""How beta becomes a factor per neuron (see ``selection.NeuronSet.scaled``)."""


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AttributionConfig(_Settings):
    """How context-aware integrated gradients are computed (paper, Eq. 3-4)."""

    n_steps: int = Field(20, ge=1, le=1000, description="Integration points along the path: the "
                         "paper's m = 20 Riemann steps, or the nodes of --quadrature gauss-legendre.")
    quadrature: Literal["riemann", "gauss-legendre"] = Field(
        "riemann", description="How the path integral is approximated: the paper's right Riemann sum "
        "(k/m, weight 1/m), or Gauss-Legendre nodes and weights (exact for polynomials of degree "
        "2n - 1; fewer points for the same accuracy on a smooth path).")
    method: Literal["fast", "reference"] = Field(
        "fast",
        description="'fast' reuses the prefix KV cache and batches steps and layers; "
        "'reference' recomputes the full sequence one layer at a time (for checking).",
    )
    internal_batch_size: int | None = Field(
        None,
        ge=1,
        exclude=True,  # how the work is batched, not what is computed: stores and manifests omit it
        description="Rows (steps x layers) per forward/backward pass of the fast method. Default: "
        "as many as fit in about 2 GiB of KV cache and logits (every layer in one pass for short "
        "prompts, fewer for long ones); set it to bound memory yourself.",
    )
    layers: list[int] | None = Field(
        None, description="Decoder layers to score (default: all)."
    )
    units: list[Literal["neuron", "head"]] = Field(
        ["neuron"], description="Unit kinds to score: FFN neurons (the paper's) and/or attention heads "
        "(ircan_serve/units.py:UNIT_KINDS); each kind is one more set of passes per example.")
    baseline: Literal["no-context", "irrelevant"] = Field(
        "no-context", description="Where the path starts: the activations without context (the paper's a'), "
        "or after the row's irrelevant documents (the nearest documents about other subjects; needs a "
        "recipe `contexts` mix). 'irrelevant' scores what changes between an irrelevant and a relevant "
        "context, not what any context turns on, so units that copy whatever is in the prompt score less.")


class SelectionConfig(_Settings):
    """How context-aware neurons are picked from the scores (paper, Section 3.2)."""

    threshold: float = Field(
        0.1, gt=0, le=1, description="t: keep neurons scoring at least t * (max score of the example)."
    )
    top_z: int = Field(20, ge=1, description="z: at most this many neurons per example.")
    num_neurons: int = Field(
        4, ge=1, description="h: keep the h neurons that occur in the most examples."
    )
    num_heads: int = Field(0, ge=0, description="g: also keep the g attention heads kept most often "
                           "(when heads were attributed, [attribution] units).")
    rule: Rule = Field(
        "signed",
        description="'paper': every selected neuron x beta; 'signed': x beta where the neuron's "
        "activation times mean gradient, summed over the attribution rows, is positive (scaling it "
        "up raises P(context's answer)), x 1/beta where negative. Default from the README's "
        "measurements.",
    )


class Splits(_Settings):
    """Three disjoint slices of one data file (after the known-facts filter, in file order)."""

    attribution: int = Field(ge=1, description="The first N rows: attribution only.")
    dev: int = Field(ge=1, description="The next N rows: choosing h, beta and the rule.")
    test: int | None = Field(None, ge=1, description="At most N of the remaining rows: reporting "
                             "only (default: all of them).")


PAPER_H = list(range(1, 17))
"""The paper's h grid for tuning."""
PAPER_BETA = [float(b) for b in range(2, 21)]
"""The paper's beta grid for tuning."""
SMALL_BETA = [0.0, 0.5, 1.5]
"""Erasing and mild scalings, added because large beta collapses small models."""

class Recipe(_Settings):
    """One export recipe: model x data set -> patched checkpoint (``export/*.toml``)."""

    name: str = Field(description="Short name; the default output folder is export/out/NAME.")
    model: str = Field("smollm2", description="Folder, hub id, .gguf file or 'smollm2'.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype: 'auto' is the checkpoint's on a GPU, float32 on CPU. "
        "Attribution points, probabilities and scores are float32 whatever this is.")
    device: str = Field("cpu", description="'cpu', 'cuda', 'cuda:N', or 'auto' (device_map='auto' "
                        "for a model larger than one GPU).")
    data: str = Field("conflicts", description="Data file (relative to the recipe's folder), or the "
                      "name of a data set shipped with the package ('conflicts').")
    data_format: str = Field("auto", description="Format of the data file: 'auto' or a name of "
                             "ircan_serve/data/formats.py:FORMATS.")
    limit: int | None = Field(None, ge=1, description="Use only the first N rows (without "
                              "[splits]: they are both the attribution and the dev rows, as in the paper).")
    splits: Splits | None = Field(None, description="Disjoint attribution / dev / test rows.")
    known_only: bool = Field(False, description="Keep only rows whose memorized answer the model "
                             "itself gives without context (the known-facts filter).")
    prompt: PromptTemplate | None = Field(None, description="The RAG prompt ({context}, {question}; "
                                          "chat = true for the chat template); default: the format's own.")
    skip_invalid: bool = Field(False, description="Skip bad rows instead of stopping.")
    contexts: list[str] = Field(["sentence"], min_length=1, description="Context formats the attribution rows (and the "
                                "dev rows, unless dev_contexts) are built in, in turn "
                                "(ircan_serve/data/contexts.py:CONTEXTS): a mix trains the units on the shapes users "
                                "retrieve; the test rows are reported in each format.")
    dev_contexts: list[str] | None = Field(None, min_length=1, description="Context formats the dev rows are built "
                                           "in, in turn (default: contexts): tuning's objective and its checks then "
                                           "run in formats attribution never saw (e.g. ['topk', 'passage-list']).")
    top_k: int = Field(4, ge=1, description="Documents per context in the 'topk' and 'irrelevant' formats.")
    beta: float = Field(
        5.0, ge=0, description="beta: factor on the selected down_proj columns (0 erases them); "
        "with the signed rule, 1/beta on the neurons that push away from the context's answer."
    )
    attribution: AttributionConfig = AttributionConfig()
    workers: int = Field(1, ge=1, description="Model replicas for attribution; above 1 it runs on Ray "
                         "(pip install 'ircan-serve[ray]'), one actor per replica.")
    ray_address: str | None = Field(None, description="Join this Ray cluster (HOST:PORT, 'auto' or "
                                    "ray://HOST:10001) instead of starting a local one.")
    selection: SelectionConfig = SelectionConfig()
    output: str | None = Field(None, description="Checkpoint folder (default export/out/NAME).")
    fitted: list[str] = Field([], description="Units with their own factors, as `ircan tune --fit` writes them "
                              "(19:201x5 a neuron, h12:3x0 a head): exported instead of the h units x beta.")
    _folder: Path | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _baseline_has_documents(self) -> Recipe:
        if self.attribution.baseline == "irrelevant" and self.contexts == ["sentence"]:
            raise ValueError("[attribution] baseline = 'irrelevant' starts the path after each row's irrelevant "
                             "documents, which only a contexts mix builds: set contexts (e.g. [\"sentence\", \"topk\"]) "
                             "or baseline = 'no-context'")
        if self.attribution.baseline == "irrelevant" and "irrelevant" in self.contexts:
            raise ValueError("[attribution] baseline = 'irrelevant' with 'irrelevant' among the contexts: those rows' "
                             "path would start where it ends and score nothing; drop one of them")
        if self.dev_contexts is not None and self.splits is None:
            raise ValueError("dev_contexts builds the dev rows apart from the attribution rows, which only [splits] "
                             "separates: add [splits] (attribution, dev) or drop dev_contexts")
        if self.dev_contexts is not None and "irrelevant" in self.dev_contexts:
            raise ValueError("dev_contexts holds 'irrelevant', whose contexts do not state the answer tuning scores; "
                             "tuning already checks every point on irrelevant documents: drop it")
        return self

    @property
    def tuning_contexts(self) -> list[str]:
        """The formats the dev rows are built in: ``dev_contexts``, or the attribution rows' ``contexts``."""
        return self.dev_contexts or self.contexts

    @property
    def folder(self) -> Path | None:
        """The folder the recipe file is in (relative data paths are read from there)."""
        return self._folder

    @property
    def path(self) -> str:
        """The recipe file, for messages (``recipe NAME`` when it was not read from a file)."""
        return f"{self.folder / self.name}.toml" if self.folder is not None else f"recipe {self.name}"

    def data_file(self) -> str:
        """``data`` as a path to read: relative to the recipe's folder, or as given (absolute paths
        and shipped data-set names). Artifacts record ``data`` as written, which stays true when
        the project folder moves."""
        path = Path(self.data).expanduser()
        is_file_path = len(path.parts) > 1 or bool(path.suffix)  # not a shipped name such as 'conflicts'
        if self.folder is None or path.is_absolute() or not is_file_path:
            return str(path)
        return str(self.folder / path)


def load_recipe(path: str | Path) -> Recipe:
    """Read a TOML recipe; relative data paths are read from the recipe's folder."""
    path = Path(path)
    if not path.is_file():
        raise IrcanError(f"recipe {path} does not exist; recipes live in export/*.toml")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise IrcanError(f"recipe {path} is not valid TOML: {e}") from e
    raw.setdefault("name", path.stem)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise IrcanError(f"recipe {path} is invalid:\n{e}") from e
    recipe._folder = path.parent
    return recipe


def write_recipe_choice(path: str | Path, h: int, beta: float, rule: str | None = None, g: int | None = None,
                        fitted: list[str] | None = None) -> None:
    """Set ``beta`` (top level), ``[selection] num_neurons`` (and ``num_heads``) and ``rule`` in a
    recipe file, keeping its comments and layout (tomlkit)."""
    import tomlkit

    from .files import atomic_write

    path = Path(path)
    doc = tomlkit.parse(path.read_text())
    doc["beta"] = float(beta)
    if fitted:
        doc["fitted"] = fitted
    elif "fitted" in doc:  # a grid choice replaces an earlier fit
        del doc["fitted"]
    if "selection" not in doc:
        doc["selection"] = tomlkit.table()
    selection = doc["selection"]
    selection["num_neurons"] = int(h)
    if g is not None:
        selection["num_heads"] = int(g)
    if rule:
        selection["rule"] = rule
    atomic_write(path, tomlkit.dumps(doc))
