"""Context-aware integrated gradients: score every unit for one conflict example.

IRCAN (NeurIPS 2024, arXiv 2406.18406), Eq. 3-4. For layer ``l`` let ``a`` be the input of the
unit projection (the FFN output projection for neurons) at the last prompt position *with* the
context and ``a'`` the same activation *without* it (or, with ``baseline = "irrelevant"``, after
documents about other subjects only). The score of feature ``i`` is

    Attr(a_i) = (a_i - a'_i) * sum_k w_k dP(y | a' + alpha_k (a - a'))/da_i

where ``P(y | .)`` is the probability of the first token of the context's answer at the last
position, with only layer ``l``'s last-position activation replaced, and (alpha_k, w_k) the
quadrature: the paper's right Riemann sum k/m, 1/m by default (:mod:`.quadrature`).

Two implementations compute the same numbers: :func:`~.reference.reference_scores` (one layer at a
time over the full sequence, for checking) and :func:`~.fast.fast_scores` (the product's path).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..answers import answer_token_id
from ..architectures import layout_for
from ..config import AttributionConfig
from ..data import ConflictExample
from ..errors import IrcanError
from ..prompts import encode
from ..units import projections, unit_width
from .fast import fast_scores
from .hooks import plain_pass
from .prefix_cache import prompt_prefix
from .quadrature import quadrature
from .reference import reference_scores
from .result import Attribution
from .store import AttributionStore, examples_to_do

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def baseline_prompt(example: ConflictExample, config: AttributionConfig) -> str:
    """The prompt whose last-position activations start the path (``a'``): the question without
    context, or after the row's irrelevant documents (``config.baseline``)."""
    if config.baseline == "no-context":
        return example.prompt_without_context
    if example.irrelevant_prompt is None:
        raise IrcanError(f"row {example.id} ({example.source or 'no source'}) has no irrelevant-documents prompt, "
                         "which [attribution] baseline = 'irrelevant' starts from: build the rows with a recipe "
                         "`contexts` mix, or set baseline = 'no-context'")
    return example.irrelevant_prompt


class ContextAwareIntegratedGradients:
    """Score units by how much they carry the context's answer (IRCAN, Section 3.1).

    Example::

        ig = ContextAwareIntegratedGradients(loaded.model, loaded.tokenizer)
        attribution = ig.attribute(example)            # fast path, m = 20, FFN neurons
        attribution.scores.shape                       # (n_layers, d_ff)
    """

    def __init__(self, model: PreTrainedModel, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.n_layers = len(projections(model, "neuron"))

    def attribute(self, example: ConflictExample, config: AttributionConfig = AttributionConfig(),
                  kind: str = "neuron") -> Attribution:
        """Scores of every feature of ``kind``'s projection in ``config.layers`` (default all)."""
        layers = config.layers if config.layers is not None else list(range(self.n_layers))
        bad = [layer for layer in layers if not 0 <= layer < self.n_layers]
        if bad:
            raise IrcanError(f"layers {bad} out of range: the model has {self.n_layers} layers")
        device = next(self.model.parameters()).device
        ids_with = torch.tensor([encode(self.tokenizer, example.prompt)], device=device)  # (1, T)
        ids_without = torch.tensor([encode(self.tokenizer, baseline_prompt(example, config))], device=device)
        token = answer_token_id(self.tokenizer, example.prompt, example.answer)
        units = projections(self.model, kind)
        fast = config.method == "fast" and ids_with.shape[1] >= 2
        without = plain_pass(self.model, units, ids_without, token)  # a'
        with_ = plain_pass(self.model, units, ids_with, token, keep_cache=fast, record_layers=fast)  # a
        points = quadrature(config.quadrature, config.n_steps)
        if fast:
            skip_own = kind == "neuron" and layout_for(self.model.config.model_type).adds_to_residual
            scores = fast_scores(self.model, units, ids_with, prompt_prefix(self.model, ids_with, with_.cache),
                                 without.activations, with_.activations, token, points, layers,
                                 config.internal_batch_size, layer_outputs=with_.layer_outputs,
                                 skip_own_layer=skip_own)
        else:
            scores = reference_scores(self.model, units, ids_with, without.activations, with_.activations,
                                      token, points, layers)
        return Attribution(
            example.id, token, scores.detach().float().cpu(), with_.prob, without.prob,
            activations_with=with_.activations.float().cpu(),
            activations_without=without.activations.float().cpu(),
            kind=kind, width=unit_width(self.model.config, kind),
        )


def attribute_examples(
    model: PreTrainedModel,
    tokenizer: Any,
    examples: Sequence[ConflictExample],
    config: AttributionConfig = AttributionConfig(),
    *,
    store: AttributionStore | None = None,
    header: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[Attribution]:
    """Attribute every example, skipping those already in ``store`` (resume after a kill); one
    record per example and unit kind of ``config.units``, in that order."""
    from tqdm.auto import tqdm

    ig = ContextAwareIntegratedGradients(model, tokenizer)
    todo = examples_to_do(examples, config, store, header)
    results: list[Attribution] = []
    bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc="attribution",
               unit="ex", disable=not progress)
    with bar:
        for example in examples:
            done = example not in todo
            for kind in config.units:
                if store is not None and store.has(example.id, kind):
                    results.append(store.get(example.id, kind))
                    continue
                result = ig.attribute(example, config, kind)
                if store is not None:
                    store.put(result)
                results.append(result)
            bar.update(0 if done else 1)
    return results
