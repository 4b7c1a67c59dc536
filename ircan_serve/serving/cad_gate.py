"""Keeps CAD's two kinds of request apart on one vLLM server, working around a vLLM 0.32 bug.

When a request with ``logprob_token_ids`` shares an engine step with requests asking for top-K
``logprobs``, vLLM's sampler hands the token-id tensors to the whole batch: the top-K requests get
only their sampled token's log-probability (and ``token_id:0`` at -9999). A :class:`_Gate` per
server lets in either kind, any number at a time, never both; :func:`gated` is what
:class:`~ircan_serve.serving.cad.CadClient` wraps each request in. The decoding loop in
:mod:`ircan_serve.serving.cad` also cuts or resends a response that still comes back garbled
(another client's requests on the same server).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, nullcontext
from typing import Any


class _Gate:
    """Lets in requests of one kind at a time, any number of them: a kind waits while the other
    is in flight, and a kind in flight admits no more of its own while the other waits (so the
    two alternate, each in one batch). CAD's kinds: top-K ``logprobs`` and ``logprob_token_ids``."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self.inside = 0
        self.waiting: Counter[str] = Counter()

    def may_enter(self, kind: str) -> bool:
        return self.inside == 0 or (self.kind == kind and not any(n for k, n in self.waiting.items() if k != kind))

    def enter(self, kind: str) -> None:
        self.kind, self.inside = kind, self.inside + 1


class _ThreadGate(_Gate):
    def __init__(self) -> None:
        super().__init__()
        self.cond = threading.Condition()

    @contextmanager
    def __call__(self, kind: str) -> Iterator[None]:
        with self.cond:
            self.waiting[kind] += 1
            try:
                self.cond.wait_for(lambda: self.may_enter(kind))
            finally:
                self.waiting[kind] -= 1
            self.enter(kind)
        try:
            yield
        finally:
            with self.cond:
                self.inside -= 1
                self.cond.notify_all()


class _TaskGate(_Gate):
    def __init__(self) -> None:
        super().__init__()
        self.cond = asyncio.Condition()

    @asynccontextmanager
    async def __call__(self, kind: str) -> AsyncIterator[None]:
        async with self.cond:
            self.waiting[kind] += 1
            try:  # a task cancelled while it waits must not stay counted
                await self.cond.wait_for(lambda: self.may_enter(kind))
            finally:
                self.waiting[kind] -= 1
                self.cond.notify_all()
            self.enter(kind)
        try:
            yield
        finally:
            async with self.cond:
                self.inside -= 1
                self.cond.notify_all()


_THREAD_GATES: dict[str, _ThreadGate] = {}
_TASK_GATES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _TaskGate]] = weakref.WeakKeyDictionary()
_GATES_LOCK = threading.Lock()


def gated(url: str, body: dict[str, Any], asynchronous: bool = False) -> Any:
    """The (async) context manager a request with this JSON ``body`` runs in: the gate of its
    server (one for threads, one per event loop) for CAD's two request kinds, nothing for others
    (``/tokenize``)."""
    kind = ("token ids" if "logprob_token_ids" in body else
            "top logprobs" if "logprobs" in body else None)
    if kind is None:
        return nullcontext()
    with _GATES_LOCK:
        if asynchronous:
            gates: dict[str, Any] = _TASK_GATES.setdefault(asyncio.get_running_loop(), {})
            gate = gates.setdefault(url, _TaskGate())
        else:
            gate = _THREAD_GATES.setdefault(url, _ThreadGate())
    return gate(kind)
