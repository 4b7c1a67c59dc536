"""Measuring tools of the benchmarks: peak memory, wall time, fresh processes, the machine's peak."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class PeakRSS:
    """Peak resident memory of this process above its level at start, sampled every 5 ms."""

    def __enter__(self) -> PeakRSS:
        import psutil

        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mib(self) -> float:
        return float(self.peak - self.start) / 2**20


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, seconds, peak extra MiB) of one call."""
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return out, seconds, mem.mib


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a new spawned process, so that no state of an earlier run is shared."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def matmul_peak_gflops(size: int = 2048, repeats: int = 8) -> float:
    """This machine's float32 matrix-product speed: the best of ``repeats`` square products,
    with torch's threads, in GFLOP/s; the ceiling the attribution paths can approach."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9
