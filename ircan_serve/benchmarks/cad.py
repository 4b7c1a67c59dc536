"""``ircan bench cad``: served CAD (two vLLM streams per token, top-K candidates) against the
product's transformers CAD (whole vocabulary), exact greedy tokens, on many real prompts.

The prompts are the shipped conflicts and CounterFact rows in the shipped template (``{context}\\n
{question}``), the context in turn as the row's sentence, a numbered-list passage and the
retriever's top 4 (:mod:`ircan_serve.data.contexts`), so the candidate set is tried on short and
long contexts alike. Both sides generate the same number of tokens from the same checkpoint; a
prompt counts as equal when every token is.
"""

from __future__ import annotations

from typing import Any

from ..data import ConflictExample


def cad_rows(n: int) -> list[ConflictExample]:
    """The first ``n`` shipped CounterFact rows, contexts in three formats in turn."""
    from ..data import load_examples
    from ..data.contexts import ContextPool, mixed
    from ..prompts import COMPLETION_TEMPLATE

    rows = load_examples("counterfact-smollm2", "counterfact", template=COMPLETION_TEMPLATE).examples
    return mixed(rows[:n], ["sentence", "passage-list", "topk"], ContextPool(rows), COMPLETION_TEMPLATE.render)


def bench_cad(checkpoint: str, n: int, alpha: float, max_tokens: int, candidates: int) -> dict[str, Any]:
    """Served and transformers CAD on ``n`` prompts; the rows where they differ."""
    from ..generation import greedy_generate
    from ..langchain import IrcanLLM
    from ..langchain.rag import ask_with_contexts
    from ..models import load_model, resolve_model
    from ..prompts import COMPLETION_TEMPLATE
    from ..serving import ServeConfig, VLLMServer
    from ..serving.cad import DEFAULT_CANDIDATES

    folder = resolve_model(checkpoint)
    rows = cad_rows(n)
    # more candidates than vLLM's default cap need a server that returns that many logprobs
    config = ServeConfig(extra_args=["--max-logprobs", str(candidates)]) if candidates > DEFAULT_CANDIDATES else None
    with VLLMServer(folder, config, require_manifest=False) as server:
        llm = IrcanLLM(**{"model": server.model_name, "base_url": server.base_url, "max_tokens": max_tokens,
                          "prompt_template": COMPLETION_TEMPLATE, "cad_alpha": alpha, "cad_candidates": candidates,
                          "timeout": 300})
        served = ask_with_contexts(llm, [(e.question or "", e.context or "") for e in rows])
    local = load_model(str(folder))
    expected = greedy_generate(local.model, local.tokenizer, [e.prompt for e in rows], max_tokens, cad_alpha=alpha,
                               prompts_without_context=[e.prompt_without_context for e in rows])
    differ = [{"id": e.id, "served": s, "transformers": t} for e, s, t in zip(rows, served, expected) if s != t]
    return {"checkpoint": checkpoint, "prompts": len(rows), "alpha": alpha, "max_tokens": max_tokens,
            "candidates": candidates, "equal": len(rows) - len(differ), "differ": differ}


def add_arguments(b: Any) -> None:
    b.add_argument("--checkpoint", default="smollm2", help="a model name or a checkpoint folder")
    b.add_argument("--prompts", type=int, default=200)
    b.add_argument("--alpha", type=float, default=0.5)
    b.add_argument("--max-tokens", type=int, default=10)
    b.add_argument("--candidates", type=int, default=20,
                   help="CAD's candidates per step (the served top K; above 20 the server gets --max-logprobs K)")
    b.add_argument("--out", help="write the result (JSON) here")


def main(ns: Any) -> None:
    from ..files import atomic_write_json

    out = bench_cad(ns.checkpoint, ns.prompts, ns.alpha, ns.max_tokens, ns.candidates)
    print(f"served CAD = transformers CAD (exact tokens) on {out['equal']}/{out['prompts']} prompts "
          f"({out['equal'] / out['prompts']:.1%}); alpha {out['alpha']}, {out['max_tokens']} tokens, "
          f"top {out['candidates']} candidates")
    for d in out["differ"]:
        print(f"  {d['id']}: served {d['served']!r} | transformers {d['transformers']!r}")
    if ns.out:
        atomic_write_json(ns.out, out)
        print(f"written: {ns.out}")
