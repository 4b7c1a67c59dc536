"""The methods compared by ``ircan eval``: one table, each row a way to patch the model, the
prompt, or the decoding.

* ``original``: the base model.
* ``ircan``: the found units, each scaled by its tuned factor (the enhancement rule).
* ``cad`` / ``ircan+cad``: context-aware decoding with alpha (default 0.5), alone and on IRCAN.
* ``instruction`` / ``ircan+instruction``: a prompt that tells the model to rely on the
  context, alone and on IRCAN (what the patch adds to what users already do).
* ``opinion``: the opinion-based prompt ``Bob said, "{context}" Q: {question} in Bob's opinion?``.
* ``erase``: the found units erased (beta = 0).
* ``shrink``: the tuned best point with beta < 1 (``tune.json``'s ``best_shrink``), else the
  found units x 0.5 -- reported apart from ``ircan``, which is always an enhancement.
* ``random-enhance`` / ``random-erase``: as many random neurons, enhanced by beta or erased,
  over several seeds (reported as mean +- std).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from ..data import ConflictExample
from ..errors import IrcanError
from ..prompts import INSTRUCTION, MC_INSTRUCTION
from ..units import Unit, UnitSet


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


def random_units(like: UnitSet, n_layers: int, d_ff: int, seed: int) -> UnitSet:
    """As many uniformly random (layer, index) neurons as ``like`` has, for ablations."""
    rng = random.Random(seed)
    picked: set[tuple[int, int]] = set()
    while len(picked) < len(like.neurons):
        picked.add((rng.randrange(n_layers), rng.randrange(d_ff)))
    return like.model_copy(update={"neurons": [Unit(layer=layer, index=i) for layer, i in sorted(picked)]})


@dataclass
class Method:
    """One evaluated configuration: a weight patch, a prompt transform, and CAD or not."""

    name: str
    neurons: UnitSet | None = None
    """The units to reweight, each with its factor (``UnitSet.scaled``)."""
    prompt: Callable[[ConflictExample], str] | None = None
    """ConflictExample -> prompt, or None for the example's own prompt."""
    cad: bool = False
    seed: int | None = None

    @contextmanager
    def patched(self, model: Any) -> Iterator[None]:
        from ..reweight import reweighted

        ctx = reweighted(model, self.neurons) if self.neurons is not None else nullcontext()
        with ctx:
            yield

    def prompts(self, examples: list[ConflictExample]) -> list[str]:
        return [self.prompt(e) if self.prompt else e.prompt for e in examples]


@dataclass(frozen=True)
class Setting:
    """What the methods are built from: the tuned units, the model's size, the ablations' seeds."""

    units: UnitSet
    n_layers: int
    d_ff: int
    seeds: int
    shrink: UnitSet | None = None
    instructed: Callable[[ConflictExample], str] | None = None
    """How a row reads with the instruction, where prefixing its prompt is wrong (chat mode: the
    instruction goes into the user message); None: :func:`instruction_prompt`."""

    @property
    def beta(self) -> float:
        return self.units.beta if self.units.beta is not None else max(self.units.scales())


def _random(name: str, s: Setting, erase: bool) -> list[Method]:
    return [Method(name, random_units(s.units, s.n_layers, s.d_ff, seed).scaled(0.0 if erase else s.beta, "paper"),
                   seed=seed) for seed in range(s.seeds)]


METHODS: dict[str, Callable[[Setting], list[Method]]] = {
    "original": lambda s: [Method("original")],
    "ircan": lambda s: [Method("ircan", s.units)],
    "cad": lambda s: [Method("cad", cad=True)],
    "ircan+cad": lambda s: [Method("ircan+cad", s.units, cad=True)],
    "instruction": lambda s: [Method("instruction", prompt=s.instructed or instruction_prompt)],
    "ircan+instruction": lambda s: [Method("ircan+instruction", s.units, prompt=s.instructed or instruction_prompt)],
    "opinion": lambda s: [Method("opinion", prompt=opinion_prompt)],
    "erase": lambda s: [Method("erase", s.units.scaled(0.0, "paper"))],
    "shrink": lambda s: [Method("shrink", s.shrink if s.shrink is not None else s.units.scaled(0.5, "paper"))],
    "random-enhance": lambda s: _random("random-enhance", s, erase=False),
    "random-erase": lambda s: _random("random-erase", s, erase=True),
}
"""Method name -> its configurations (random ablations: one per seed)."""


def build_methods(names: list[str], setting: Setting) -> list[Method]:
    """The :class:`Method` objects for ``names``, in order."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise IrcanError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    return [method for name in names for method in METHODS[name](setting)]
