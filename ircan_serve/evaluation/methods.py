"""The methods compared by ``ircan eval``: each is a way to patch the model and/or the prompt.

* ``original``: the base model.
* ``ircan``: the found neurons, each scaled by its tuned factor (the enhancement rule).
* ``cad`` / ``ircan+cad``: context-aware decoding with alpha (default 0.5), alone and on IRCAN.
* ``instruction``: a prompt that tells the model to rely on the context.
* ``opinion``: the opinion-based prompt ``Bob said, "{context}" Q: {question} in Bob's opinion?``.
* ``erase``: the found neurons erased (beta = 0).
* ``shrink``: the tuned best point with beta < 1 (``tune.json``'s ``best_shrink``), else the
  found neurons x 0.5 -- reported apart from ``ircan``, which is always an enhancement.
* ``random-enhance`` / ``random-erase``: as many random neurons, enhanced by beta or erased,
  over several seeds (reported as mean +- std).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from ..config import EVAL_METHODS
from ..data import MC_INSTRUCTION, ConflictExample
from ..reweight import reweighted
from ..selection import Neuron, NeuronSet

INSTRUCTION = "Answer using only the information given in the context, even if it contradicts what you know."
METHODS = EVAL_METHODS


def instruction_prompt(e: ConflictExample) -> str:
    """The example's prompt behind an instruction to rely on the context."""
    return f"{INSTRUCTION}\n{e.prompt}"


def opinion_prompt(e: ConflictExample) -> str:
    """The opinion-based prompt of Zhou et al. (2023), in the example's answer format."""
    context, question = e.context or "", e.question or e.prompt_without_context
    if e.task == "multiple_choice":
        return f'{MC_INSTRUCTION}\nBob said, "{context}"\nQ: {question} in Bob\'s opinion?\nAnswer:'
    if e.task == "completion":
        return f'Bob said, "{context}" {question}'
    return f'Bob said, "{context}"\nQ: {question} in Bob\'s opinion?\nAnswer:'


def random_neurons(like: NeuronSet, n_layers: int, d_ff: int, seed: int) -> NeuronSet:
    """As many uniformly random (layer, index) neurons as ``like`` has, for ablations."""
    rng = random.Random(seed)
    picked: set[tuple[int, int]] = set()
    while len(picked) < len(like.neurons):
        picked.add((rng.randrange(n_layers), rng.randrange(d_ff)))
    return like.model_copy(update={"neurons": [Neuron(layer=l, index=i) for l, i in sorted(picked)]})


@dataclass
class Method:
    """One evaluated configuration: a weight patch, a prompt transform, and CAD or not."""

    name: str
    neurons: NeuronSet | None = None
    """The neurons to reweight, each with its factor (``NeuronSet.scaled``)."""
    prompt: Any = None  # ConflictExample -> str, or None for the example's own prompt
    cad: bool = False
    seed: int | None = None

    @contextmanager
    def patched(self, model: Any) -> Iterator[None]:
        ctx = reweighted(model, self.neurons) if self.neurons is not None else nullcontext()
        with ctx:
            yield

    def prompts(self, examples: list[ConflictExample]) -> list[str]:
        return [self.prompt(e) if self.prompt else e.prompt for e in examples]


def build_methods(names: list[str], neurons: NeuronSet, n_layers: int, d_ff: int,
                  seeds: int, shrink: NeuronSet | None = None) -> list[Method]:
    """The :class:`Method` objects for ``names`` (random ablations expand to one per seed).

    ``neurons`` carry their tuned factors; ``shrink`` is the tuned beta < 1 point, if any.
    """
    beta = neurons.beta if neurons.beta is not None else max(neurons.scales())
    out: list[Method] = []
    for name in names:
        if name == "original":
            out.append(Method(name))
        elif name == "ircan":
            out.append(Method(name, neurons))
        elif name == "cad":
            out.append(Method(name, cad=True))
        elif name == "ircan+cad":
            out.append(Method(name, neurons, cad=True))
        elif name == "instruction":
            out.append(Method(name, prompt=instruction_prompt))
        elif name == "opinion":
            out.append(Method(name, prompt=opinion_prompt))
        elif name == "erase":
            out.append(Method(name, neurons.scaled(0.0, "paper")))
        elif name == "shrink":
            out.append(Method(name, shrink if shrink is not None else neurons.scaled(0.5, "paper")))
        elif name in ("random-enhance", "random-erase"):
            for seed in range(seeds):
                rnd = random_neurons(neurons, n_layers, d_ff, seed)
                out.append(Method(name, rnd.scaled(beta if name == "random-enhance" else 0.0, "paper"), seed=seed))
        else:
            from ..errors import IrcanError

            raise IrcanError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return out
