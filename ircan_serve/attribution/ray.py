"""Attribution on Ray: the examples of one run spread over N model replicas.

``ircan attribute --workers N`` (or ``workers = N`` in a recipe) starts N Ray actors, each of
which loads the model once (``num_gpus=1`` on a GPU host, so each replica has its own GPU) and
scores the examples it is handed, one at a time. The driver hands out examples as workers free
up, aggregates progress in one bar and writes every returned record into the one
:class:`~ircan_serve.attribution.store.AttributionStore`, atomically, as it arrives: workers need no
shared filesystem, a killed run resumes after its last finished example, and the results are
those of one process (each example is scored by the same code on the same weights).

A worker that dies mid-run (out of memory, a lost node) is restarted by Ray and the example it
held is scored again; the others are kept. ``address`` joins an existing cluster
(``ray start --head`` on one node, ``ray start --address HEAD:6379`` on the others; see
deploy/README.md) instead of starting a local one.

Ray is an optional extra: ``pip install 'ircan-serve[ray]'``.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

from ..config import AttributionConfig
from ..data import ConflictExample
from ..errors import IrcanError
from .result import Attribution
from .store import AttributionStore, examples_to_do

log = logging.getLogger(__name__)

MAX_RESTARTS = 2
"""How often a dead worker is restarted (and its example retried) before the run stops."""


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise IrcanError("--workers/--address need Ray: pip install 'ircan-serve[ray]' "
                         "(make setup installs it)") from None
    return ray


def check_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast, with a clear message, when a ``HOST:PORT`` Ray address does not answer
    (``ray.init`` would otherwise retry for a long time). ``auto`` and ``ray://`` addresses are
    left to Ray."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise IrcanError(f"Ray address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379), 'auto' or ray://HOST:10001")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise IrcanError(f"Ray address {address} does not answer ({e}); start the head node with "
                         "`ray start --head --port " + port + "` there, or leave --address out for a "
                         "local cluster") from None


def init_ray(workers: int, address: str | None = None) -> bool:
    """Join the cluster at ``address``, or start a local one with ``workers`` CPUs (no
    dashboard, a small object store). Returns whether this call started or joined it (False when
    Ray was already initialized)."""
    ray = _import_ray()
    if ray.is_initialized():
        return False
    try:
        if address:
            check_address(address)
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     object_store_memory=200 * 1024**2, configure_logging=False)
    except IrcanError:
        raise
    except Exception as e:  # ConnectionError, RuntimeError, ValueError: Ray's own message says why
        raise IrcanError(f"could not start or join a Ray cluster{' at ' + address if address else ''}: {e}") from e
    return True


class _Worker:
    """One model replica (a Ray actor). Built by :func:`attribute_on_ray`."""

    def __init__(self, model: str, dtype: str, device: str, threads: int | None) -> None:
        import torch

        from ..models import load_model
        from .integrated_gradients import ContextAwareIntegratedGradients

        if threads:
            torch.set_num_threads(threads)
        lm = load_model(model, device=device, dtype=dtype)
        self.ig = ContextAwareIntegratedGradients(lm.model, lm.tokenizer)

    def attribute(self, example: ConflictExample, config: AttributionConfig) -> list[Attribution]:
        # Fault injection for the tests: IRCAN_FAULT_KILL_WORKER=EXAMPLE_ID@MARKER makes the
        # worker holding EXAMPLE_ID die once (as a lost node or an OOM kill would).
        fault = os.environ.get("IRCAN_FAULT_KILL_WORKER", "")
        example_id, _, marker = fault.rpartition("@")
        if fault and example.id == example_id and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return [self.ig.attribute(example, config, kind) for kind in config.units]


def attribute_on_ray(
    model: str,
    examples: Sequence[ConflictExample],
    config: AttributionConfig = AttributionConfig(),
    *,
    workers: int,
    store: AttributionStore | None = None,
    header: dict[str, Any] | None = None,
    address: str | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    progress: bool = True,
) -> list[Attribution]:
    """Attribute ``examples`` on ``workers`` Ray actors, skipping those already in ``store``.

    Args:
        model: what :func:`~ircan_serve.models.load_model` takes (a folder path, so that every
            node can load it; 'smollm2' works on nodes that ran ``make setup``).
        workers: model replicas. More than the examples left is reduced to their number, with a
            warning.
        address: an existing cluster (``HOST:PORT``, ``auto`` or ``ray://HOST:10001``); None
            starts a local one with ``workers`` CPUs.
    Returns:
        Every example's attribution, in the order of ``examples``.
    """
    if workers < 1:
        raise IrcanError(f"--workers must be at least 1, not {workers}")
    todo = examples_to_do(examples, config, store, header)
    done: dict[tuple[str, str], Attribution] = {}
    if todo and workers > len(todo):
        log.warning("--workers %d but only %d example(s) left to attribute: using %d worker(s)",
                    workers, len(todo), len(todo))
        workers = len(todo)
    if todo:
        ray = _import_ray()
        started = init_ray(workers, address)
        actors = _start_actors(ray, model, workers, dtype, device, address)
        try:
            _run_queue(ray, actors, todo, config, store, done, total=len(examples), progress=progress)
        finally:
            for actor in actors:  # also ends a task still running after an error or Ctrl-C
                ray.kill(actor, no_restart=True)
            if started:
                ray.shutdown()  # the local cluster (or connection) this call made
    kinds = config.units
    if store is None:  # nothing was stored before: every example was done here
        return [done[(e.id, k)] for e in examples for k in kinds]
    return [done[(e.id, k)] if (e.id, k) in done else store.get(e.id, k) for e in examples for k in kinds]


def _start_actors(ray: Any, model: str, workers: int, dtype: str, device: str, address: str | None) -> list[Any]:
    """``workers`` model replicas: one GPU each on a GPU host, else the local cores split between them."""
    gpu = device.startswith("cuda") or device == "auto"
    actor_cls = ray.remote(num_cpus=0 if gpu else 1, num_gpus=1 if gpu else 0,
                           max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)(_Worker)
    threads = None if (gpu or address) else max(1, (os.cpu_count() or 1) // workers)
    return [actor_cls.remote(model, dtype, device, threads) for _ in range(workers)]


def _run_queue(ray: Any, actors: list[Any], todo: list[ConflictExample], config: AttributionConfig,
               store: AttributionStore | None, done: dict[tuple[str, str], Attribution], *, total: int,
               progress: bool) -> None:
    """Hand the examples out as actors free up; write each record into ``store`` as it arrives."""
    from tqdm.auto import tqdm

    queue = list(reversed(todo))
    running: dict[Any, tuple[Any, ConflictExample]] = {}

    def hand(actor: Any) -> None:
        if queue:
            example = queue.pop()
            running[actor.attribute.remote(example, config)] = (actor, example)

    with tqdm(total=total, initial=total - len(todo), desc=f"attribution ({len(actors)} workers)", unit="ex",
              disable=not progress) as bar:
        for actor in actors:
            hand(actor)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            actor, example = running.pop(ready[0])
            try:
                results = ray.get(ready[0])
            except Exception as e:  # the worker died more than MAX_RESTARTS times, or raised
                cause = getattr(e, "cause", None) or e
                raise IrcanError(f"attribution of example {example.id!r} failed on a Ray worker: {cause}; "
                                 "finished examples are kept"
                                 + (f" in {store.path}: rerun to resume" if store is not None else "")) from e
            for result in results:
                if store is not None:
                    store.put(result)
                done[(result.example_id, result.kind)] = result
            bar.update(1)
            hand(actor)
