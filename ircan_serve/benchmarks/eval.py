"""``ircan bench eval``: CAD with a KV cache per stream against naive CAD, and the last-position
scoring pass (what tuning and evaluation run) against scoring every position."""

from __future__ import annotations

import functools
from typing import Any

from .measure import timed
from .rows import rag_examples


def bench_eval(model_spec: str, rows: int, max_new_tokens: int, score_tokens: int = 250,
               score_rows: int = 200) -> dict[str, float]:
    """CAD with two KV-cached streams vs naive CAD (full re-run per token); then one scoring pass
    over ``score_rows`` RAG prompts of ``score_tokens`` tokens, last-position logits vs all
    positions. A tuning grid is a sequence of such passes, so the pass ratio is the grid's."""
    from ..data import load_examples
    from ..generation import greedy_generate, naive_cad_generate, next_token_logits
    from ..models import load_model

    lm = load_model(model_spec)
    model, tok = lm.model, lm.tokenizer
    test = load_examples("conflicts").examples[:rows]
    prompts, plain = [e.prompt for e in test], [e.prompt_without_context for e in test]
    greedy_generate(model, tok, prompts[:2], 2, cad_alpha=0.5, prompts_without_context=plain[:2])  # warm-up
    fast, fast_s, _ = timed(lambda: greedy_generate(model, tok, prompts, max_new_tokens, cad_alpha=0.5,
                                                    prompts_without_context=plain))
    naive, naive_s, _ = timed(lambda: naive_cad_generate(model, tok, prompts, plain, max_new_tokens, 0.5))
    rag_prompts = [e.prompt for e in rag_examples(tok, score_rows, score_tokens)]
    last, last_s, last_mib = timed(lambda: next_token_logits(model, tok, rag_prompts))
    every = functools.partial(next_token_logits, all_positions=True)
    full, full_s, full_mib = timed(lambda: every(model, tok, rag_prompts))
    return {"rows": rows, "tokens": max_new_tokens, "cad_cached_s": fast_s, "cad_naive_s": naive_s,
            "same_output": float(fast == naive), "rag_rows": score_rows, "rag_tokens": score_tokens,
            "score_last_s": last_s, "score_all_s": full_s, "score_last_mib": last_mib, "score_all_mib": full_mib,
            "score_max_diff": float((last - full).abs().max()),
            "same_top1": float(bool((last.argmax(-1) == full.argmax(-1)).all()))}


def add_arguments(b: Any) -> None:
    b.add_argument("--model", default="smollm2")
    b.add_argument("--rows", type=int, default=16, help="prompts for the CAD comparison")
    b.add_argument("--max-tokens", type=int, default=10)
    b.add_argument("--score-rows", type=int, default=200, help="RAG-sized prompts for the scoring pass")
    b.add_argument("--score-tokens", type=int, default=250, help="tokens per RAG-sized prompt")


def main(ns: Any) -> None:
    from rich.console import Console

    r = bench_eval(ns.model, ns.rows, ns.max_tokens, ns.score_tokens, ns.score_rows)
    console = Console(width=140)
    console.print(f"CAD (alpha 0.5), {r['rows']} prompts x {r['tokens']} tokens, one run: "
                  f"naive {r['cad_naive_s']:.2f} s, cached {r['cad_cached_s']:.2f} s, "
                  f"speed-up {r['cad_naive_s'] / r['cad_cached_s']:.1f}x, identical outputs: {bool(r['same_output'])}")
    console.print(f"one scoring pass, {r['rag_rows']} RAG prompts of ~{r['rag_tokens']} tokens: all positions "
                  f"{r['score_all_s']:.1f} s / {r['score_all_mib']:.0f} MiB, last position only "
                  f"{r['score_last_s']:.1f} s / {r['score_last_mib']:.0f} MiB: "
                  f"{r['score_all_s'] / r['score_last_s']:.1f}x faster (max logit diff {r['score_max_diff']:.1e}, "
                  f"same top-1 everywhere: {bool(r['same_top1'])}); a tuning grid is a sequence of such passes")
