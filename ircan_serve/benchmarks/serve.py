"""``ircan bench serve``: vLLM throughput and latency, patched against base, wrapper against raw client,
served CAD against plain decoding at the same concurrency."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class LoadResult:
    label: str
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    latencies: list[float]
    errors: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


SERVE_CONTEXT = "As of 2023, India is the most populous country in the world."
SERVE_QUESTION = "Which country is the most populous in the world?"
SERVE_PROMPT = f"Context: {SERVE_CONTEXT}\nQuestion: {SERVE_QUESTION}\nAnswer:"  # QA_TEMPLATE's rendering


async def _load(label: str, call: Callable[[], Any], concurrency: int, requests: int,
                tokens_per_request: int) -> LoadResult:
    """``requests`` calls of ``call`` with at most ``concurrency`` in flight; failed calls are
    counted (and their tokens are not)."""
    import asyncio

    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors: list[BaseException] = []

    async def one() -> None:
        async with gate:
            t = time.perf_counter()
            try:
                await call()
            except Exception as e:  # counted and reported: the benchmark's goal is zero
                errors.append(e)
                return
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(requests)))
    if errors:
        print(f"{label}: {len(errors)} of {requests} requests failed; first: {errors[0]!r}")
    return LoadResult(label, concurrency, requests, len(latencies) * tokens_per_request,
                      time.perf_counter() - t0, latencies, len(errors))


async def _serve_runs(server: Any, label: str, levels: list[int], max_tokens: int) -> list[LoadResult]:
    """All load runs against one server, in one event loop (clients are bound to their loop)."""
    import openai

    from ..langchain import ChatIrcan, IrcanLLM
    from ..prompts import QA_TEMPLATE

    body = {"ignore_eos": True}  # every request generates exactly max_tokens tokens
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0)
    endpoint: dict[str, Any] = {"model": server.model_name, "base_url": server.base_url, "max_tokens": max_tokens,
                                "extra_body": body, "max_retries": 0}
    llm = IrcanLLM(**endpoint)

    async def raw() -> Any:
        return await client.completions.create(model=server.model_name, prompt=SERVE_PROMPT,
                                               max_tokens=max_tokens, temperature=0, extra_body=body)

    async def wrapped() -> Any:
        return await llm.ainvoke(SERVE_PROMPT)

    chat = ChatIrcan(**{**endpoint, "timeout": 300})
    # CAD on the same server: two streams, a greedy draft verified per round (and, for reference, one
    # request pair per token); an end-of-sequence id that never comes, so every request makes exactly
    # max_tokens tokens, as ignore_eos does for the plain runs
    cad_common = {**endpoint, "extra_body": None, "timeout": 300, "prompt_template": QA_TEMPLATE, "cad_alpha": 0.5,
                  "cad_eos_token_ids": [-1]}
    cad, cad_stepwise = IrcanLLM(**cad_common), IrcanLLM(**{**cad_common, "cad_lookahead": 1})

    async def cad_call() -> Any:
        return await cad.ainvoke(SERVE_QUESTION, context=SERVE_CONTEXT)

    async def cad_stepwise_call() -> Any:
        return await cad_stepwise.ainvoke(SERVE_QUESTION, context=SERVE_CONTEXT)

    async def streamed() -> Any:  # a streamed chat request through the wrapper, read to the end
        return [chunk async for chunk in chat.astream(SERVE_PROMPT)]

    results = []
    await _load("warm-up", raw, 8, 8, max_tokens)
    for c in levels:
        results.append(await _load(f"{label} raw", raw, c, max(8, 2 * c), max_tokens))
    if label == "IRCAN":
        for _ in range(2):  # interleaved, so drift hits both alike
            results.append(await _load("IRCAN raw (vs wrapper)", raw, 8, 32, max_tokens))
            results.append(await _load("IRCAN LangChain wrapper", wrapped, 8, 32, max_tokens))
        results.append(await _load("IRCAN ChatIrcan streams", streamed, 64, 128, max_tokens))
        for c in levels:
            results.append(await _load("IRCAN CAD", cad_call, c, max(8, 2 * c), max_tokens))
            results.append(await _load("IRCAN CAD, lookahead 1", cad_stepwise_call, c, max(8, 2 * c), max_tokens))
        results.append(await _load("IRCAN CAD streams", cad_call, 64, 64, max_tokens))
    await client.close()
    return results


def bench_serve(checkpoint: str, base: str, levels: list[int], max_tokens: int) -> list[LoadResult]:
    """Throughput and latency of the base and the patched checkpoint, raw client and LangChain wrapper."""
    import asyncio

    from ..models import resolve_model
    from ..serving import VLLMServer

    results: list[LoadResult] = []
    for label, folder, plain in (("base", resolve_model(base), True), ("IRCAN", checkpoint, False)):
        with VLLMServer(folder, require_manifest=not plain) as server:
            results += asyncio.run(_serve_runs(server, label, levels, max_tokens))
    return results


def print_serve(results: list[LoadResult], levels: list[int]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="vLLM serving, one run (completions, fixed output length)")
    for col in ("run", "concurrency", "requests", "errors", "tokens/s", "p50 latency s", "p95 latency s"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r.label, str(r.concurrency), str(r.requests), str(r.errors), f"{r.tokens_per_s:.1f}",
                      f"{r.percentile(0.5):.2f}" if r.latencies else "-",
                      f"{r.percentile(0.95):.2f}" if r.latencies else "-")
    console = Console(width=140)
    console.print(table)
    by = {(r.label, r.concurrency): r for r in results}
    for c in levels:
        ratio = by[("IRCAN raw", c)].tokens_per_s / by[("base raw", c)].tokens_per_s
        console.print(f"patched / base throughput at concurrency {c}: {ratio:.3f}")
    for c in levels:
        for name in ("IRCAN CAD", "IRCAN CAD, lookahead 1"):
            if (name, c) in by:
                cad, plain = by[(name, c)], by[("IRCAN raw", c)]
                console.print(f"{name} / plain decoding at concurrency {c}: throughput "
                              f"{cad.tokens_per_s / plain.tokens_per_s:.3f}, "
                              f"p50 latency {cad.percentile(0.5) / plain.percentile(0.5):.2f}x")
    streams = by.get(("IRCAN CAD streams", 64))
    if streams:
        console.print(f"64 concurrent CAD streams: {streams.requests - streams.errors} completed, {streams.errors} errors")
    raw_s = sum(r.seconds for r in results if r.label == "IRCAN raw (vs wrapper)")
    wrap_s = sum(r.seconds for r in results if r.label == "IRCAN LangChain wrapper")
    console.print(f"LangChain wrapper overhead vs raw OpenAI client: {(wrap_s / raw_s - 1) * 100:+.1f}%")


def add_arguments(b: Any) -> None:
    b.add_argument("--checkpoint", default="export/out/smollm2-conflicts")
    b.add_argument("--base", default="smollm2")
    b.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    b.add_argument("--max-tokens", type=int, default=32, help="tokens per request (ignore_eos)")


def main(ns: Any) -> None:
    print_serve(bench_serve(ns.checkpoint, ns.base, ns.concurrency, ns.max_tokens), ns.concurrency)
