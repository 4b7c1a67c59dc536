"""``ircan``: a thin command line over the library.

Each subcommand parses its flags, calls one library function and prints a short summary.
torch, transformers and vLLM are imported inside the handlers, so ``ircan --help`` is instant.
Flags of the typed settings (``AttributionConfig``, ``SelectionConfig``) are generated from
their fields, so the help text is the fields' documentation.
"""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .errors import IrcanError

log = logging.getLogger("ircan_serve")


# --------------------------------------------------------------------------- flags from configs


def add_config_flags(parser: argparse.ArgumentParser, config: type[BaseModel],
                     exclude: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per field of ``config``, typed, with its description and default."""
    group = parser.add_argument_group(config.__name__, (config.__doc__ or "").strip())
    for name, field in config.model_fields.items():
        if name in exclude:
            continue
        flag = "--" + name.replace("_", "-")
        help_ = f"{field.description or ''} (default: {field.default})"
        ann = field.annotation
        args = typing.get_args(ann)
        if typing.get_origin(ann) in (typing.Union, types.UnionType):
            ann = next(a for a in args if a is not type(None))
            args = typing.get_args(ann)
        kwargs: dict[str, Any] = {
            "dest": f"{config.__name__}.{name}", "default": None, "help": help_, "metavar": name.upper(),
        }
        if typing.get_origin(ann) is typing.Literal:
            group.add_argument(flag, choices=list(args), **{**kwargs, "metavar": None})
        elif typing.get_origin(ann) is list:
            group.add_argument(flag, nargs="+", type=args[0], **kwargs)
        elif ann is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **{**kwargs, "metavar": None})
        else:
            group.add_argument(flag, type=ann, **kwargs)


def config_from_flags(ns: argparse.Namespace, config: type[BaseModel], base: BaseModel | None = None) -> Any:
    """Build ``config`` from the flags that were given, on top of ``base`` (or the defaults)."""
    prefix = config.__name__ + "."
    given = {k[len(prefix):]: v for k, v in vars(ns).items() if k.startswith(prefix) and v is not None}
    start = dict(base) if base is not None else {}  # every field, those left out of dumps too
    try:
        return config.model_validate({**start, **given})
    except Exception as e:  # pydantic's message names the field and the rule
        raise IrcanError(f"invalid {config.__name__} flags:\n{e}") from e


# --------------------------------------------------------------------------- handlers


def _summary(title: str, rows: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in rows.items():
        table.add_row(key, str(value))
    Console().print(table)


def cmd_attribute(ns: argparse.Namespace) -> None:
    from .attribution import AttributionStore
    from .config import AttributionConfig
    from .models import load_model
    from .pipeline import attribute_rows, load_checked_data, store_header

    config = config_from_flags(ns, AttributionConfig)
    if ns.workers < 1:
        raise IrcanError(f"--workers must be at least 1, not {ns.workers}")
    if ns.address:
        from .distributed import check_address

        check_address(ns.address)  # before loading anything
    lm = load_model(ns.model, device=ns.device, dtype=ns.dtype)
    data = load_checked_data(lm, ns.data, ns.format, skip_invalid=ns.skip_invalid, limit=ns.limit)
    results = attribute_rows(lm, data.examples, config, AttributionStore(ns.store),
                             store_header(lm, ns.data, ns.format), workers=ns.workers, address=ns.address,
                             dtype=ns.dtype, device=ns.device)
    gain = sum(r.prob_with_context - r.prob_without_context for r in results) / len(results)
    _summary("attribution", {
        "model": lm.name, "examples": len(results), "skipped rows": len(data.skipped) or "none",
        "method": config.method, "steps": config.n_steps, "store": ns.store,
        "workers": f"{ns.workers} (Ray{' at ' + ns.address if ns.address else ', local'})" if ns.workers > 1 or ns.address else 1,
        "mean P(answer) gain from context": f"{gain:+.3f}",
    })
    if data.skipped:
        print(data.skip_summary())


def cmd_select(ns: argparse.Namespace) -> None:
    from .attribution import AttributionStore
    from .config import SelectionConfig
    from .selection import select_neurons

    config = config_from_flags(ns, SelectionConfig)
    store = AttributionStore(ns.store)
    records = store.all()
    if not records:
        raise IrcanError(f"{ns.store} holds no attribution results; run `ircan attribute` first")
    neurons = select_neurons(records, config)
    if ns.beta is not None:
        neurons = neurons.scaled(ns.beta, config.rule)
    output = Path(ns.output) if ns.output else Path(ns.store) / "neurons.json"
    neurons.save(output)
    _summary("selection", {
        "examples": neurons.n_examples, "t / z / h": f"{config.threshold} / {config.top_z} / {config.num_neurons}",
        "neurons (layer:index x count)": ", ".join(f"{n.layer}:{n.index}x{n.count}" for n in neurons.neurons),
        "scales": ", ".join(f"{f:g}" for f in neurons.scales()) if neurons.beta is not None else "(no --beta)",
        "written": output,
    })


def cmd_export(ns: argparse.Namespace) -> None:
    if ns.recipe:
        from .config import load_recipe
        from .pipeline import run_recipe

        recipe = load_recipe(ns.recipe)
        if ns.output:
            recipe = recipe.model_copy(update={"output": ns.output})
        if ns.beta is not None:
            recipe = recipe.model_copy(update={"beta": ns.beta})
        result = run_recipe(recipe, force=ns.force)
        m = result.manifest
        _summary(f"export {recipe.name}", {
            "model": recipe.model, "data": f"{recipe.data} ({m.dataset.n_examples if m.dataset else '?'} rows)",
            "skipped rows": len(result.skipped) or "none",
            "neurons": ", ".join(f"{n.layer}:{n.index}" for n in m.neurons), "beta": m.beta,
            "attribution store": result.store, "checkpoint": result.output,
        })
        return
    if not (ns.model and ns.neurons):
        raise IrcanError("give a RECIPE, or --model and --neurons (and --beta, --output)")
    from .export import export_checkpoint
    from .models import resolve_model
    from .selection import NeuronSet

    neurons = NeuronSet.load(ns.neurons)
    if ns.beta is None and neurons.beta is None:
        raise IrcanError("no beta: pass --beta or set it in the neurons file (`ircan select --beta`)")
    if not ns.output:
        raise IrcanError("pass --output DIR for the checkpoint folder")
    if ns.num_neurons:
        neurons = neurons.top(ns.num_neurons)
    if ns.beta is not None:  # the file's rule (default: the paper's) with the new beta
        neurons = neurons.scaled(ns.beta, neurons.rule or "paper")
    manifest = export_checkpoint(resolve_model(ns.model), neurons, None, ns.output,
                                 base_model=ns.model, force=ns.force)
    _summary("export", {"checkpoint": ns.output, "neurons": len(manifest.neurons), "beta": manifest.beta,
                        "rule": manifest.rule, "weight files": len(manifest.files)})


def cmd_verify(ns: argparse.Namespace) -> None:
    from .export import verify_checkpoint

    report = verify_checkpoint(ns.dir, base=ns.base)
    _summary(f"verify {ns.dir}", {
        "weight files hashed": report.files_checked,
        "tensors compared with base": report.tensors_compared if ns.base else "(no --base)",
        "neuron slices checked": report.columns_checked if ns.base else "(no --base)",
        "result": "OK" if report.ok else f"{len(report.problems)} problems",
    })
    for problem in report.problems:
        print("  -", problem)
    if not report.ok:
        raise SystemExit(1)


def cmd_serve(ns: argparse.Namespace) -> None:
    from .models import resolve_model
    from .serving import ServeConfig, serve_forever

    config = config_from_flags(ns, ServeConfig)
    config = config.model_copy(update={"extra_args": list(ns.vllm_args)})
    model_dir = resolve_model(ns.dir) if ns.plain else ns.dir

    def announce(server) -> None:  # type: ignore[no-untyped-def]
        print(f"serving {server.model_name!r} at {server.base_url}  (Ctrl-C stops; log: {server.log_path})",
              flush=True)

    serve_forever(model_dir, config, require_manifest=not ns.plain, announce=announce)


def cmd_tune(ns: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from .attribution import AttributionStore
    from .config import load_recipe
    from .evaluation.tuning import tune, write_choice_to_recipe
    from .models import load_model
    from .pipeline import recipe_data, recipe_paths
    from .selection import select_neurons

    recipe = load_recipe(ns.recipe)
    paths = recipe_paths(recipe)
    records = AttributionStore(paths.store).all()
    if not records:
        raise IrcanError(f"no attribution results in {paths.store}; run `ircan export {ns.recipe}` first")
    hs, betas = ns.h, ns.beta
    neurons = select_neurons(records, recipe.selection.model_copy(update={"num_neurons": max(hs)}))
    lm = load_model(recipe.model, device=recipe.device, dtype=recipe.dtype)
    data = recipe_data(recipe, lm)
    dev = data.dev
    result = tune(lm.model, lm.tokenizer, neurons, dev, hs=hs, betas=betas, rules=ns.rule,
                  min_agreement=ns.min_agreement, max_drop=ns.max_drop)
    which = ("the recipe's attribution rows (no \\[splits]: the paper's protocol)" if recipe.splits is None
             else "rows disjoint from the attribution rows")
    table = Table(title=f"tune {recipe.name}: {len(dev)} dev rows, {which}")
    for col in ("rule", "h", "beta", "dev accuracy", "dev stubbornness", "top-1 agreement (no context)",
                "locality", "agreeing ctx", "KL", "collapsed"):
        table.add_column(col, justify="right")
    for row in result.table():
        table.add_row(*row)
    console = Console(width=160)
    console.print(table)
    oc = result.original_checks
    console.print(f"original: accuracy {result.original.accuracy:.3f}, stubbornness "
                  f"{result.original.stubbornness:.3f}, locality {oc.locality}, agreeing {oc.agreeing}; "
                  f"grid of {len(result.grid)} points in {result.seconds:.0f} s")
    report = paths.store / "tune.json"
    report.write_text(result.model_dump_json(indent=2))
    if result.best_shrink is not None:
        b = result.best_shrink
        console.print(f"best shrinking point (reported apart, not chosen): {b.rule} h = {b.h}, beta = {b.beta:g} "
                      f"(dev accuracy {b.dev.accuracy:.3f})")
    if result.best is None:
        raise IrcanError("every enhancing grid point collapsed (agreement < "
                         f"{ns.min_agreement} or a side check dropped > {ns.max_drop}); nothing written")
    best = result.best
    console.print(f"chosen: {best.rule} h = {best.h}, beta = {best.beta:g} (dev accuracy {best.dev.accuracy:.3f}); "
                  f"grid in {report}")
    if ns.write:
        write_choice_to_recipe(ns.recipe, best.h, best.beta, best.rule)
        neurons.top(best.h).scaled(best.beta, best.rule).save(paths.store / "neurons.json")
        console.print(f"written to {ns.recipe}; rebuild with `ircan export {ns.recipe} --force`")


def cmd_eval(ns: argparse.Namespace) -> None:
    import json as _json

    from .architectures import ffn_width
    from .attribution import AttributionStore
    from .config import load_recipe
    from .evaluation.methods import build_methods
    from .evaluation.report import write_report
    from .evaluation.runner import evaluate
    from .models import load_model
    from .pipeline import load_checked_data, recipe_data, recipe_paths
    from .selection import NeuronSet, select_neurons

    recipe = load_recipe(ns.recipe)
    paths = recipe_paths(recipe)
    neurons_file = paths.store / "neurons.json"
    neurons = NeuronSet.load(neurons_file)
    if neurons.beta is None:
        neurons = neurons.scaled(recipe.beta, recipe.selection.rule)
    tune_file = paths.store / "tune.json"
    tune_grid = _json.loads(tune_file.read_text()) if tune_file.is_file() else None
    lm = load_model(recipe.model, device=recipe.device, dtype=recipe.dtype)
    if ns.test:
        test = Path(ns.test)
        if recipe.data != "conflicts" and test.resolve() == Path(recipe.data).resolve():
            raise IrcanError("--test is the recipe's attribution/tuning file; pass the test split "
                             "(or give the recipe [splits] and omit --test to use its test rows)")
        examples = load_checked_data(lm, str(test), ns.format, skip_invalid=ns.skip_invalid, limit=ns.limit,
                                     template=recipe.prompt).examples
        test_name, test_id = test.stem, str(test.resolve())
    elif recipe.splits is not None:
        examples = recipe_data(recipe, lm).test[: ns.limit]
        test_name, test_id = "test-split", f"{recipe.data} [test split]"
    else:
        raise IrcanError("pass --test FILE, or give the recipe [splits] so it has its own test rows")
    shrink = None
    if tune_grid and tune_grid.get("best_shrink"):
        b = tune_grid["best_shrink"]
        records = AttributionStore(paths.store).all()
        shrink = select_neurons(records, recipe.selection.model_copy(update={"num_neurons": b["h"]})).scaled(
            b["beta"], b.get("rule", "paper"))
    n_layers = lm.model.config.num_hidden_layers
    methods = build_methods(ns.methods, neurons, n_layers, ffn_width(lm.model), ns.seeds, shrink=shrink)
    out = Path(ns.out) if ns.out else paths.store.with_name(f"{recipe.name}.eval-{test_name}")
    settings = {"recipe": recipe.model_dump(), "test": test_id, "limit": ns.limit, "alpha": ns.alpha,
                "neurons": [n.model_dump() for n in neurons.neurons], "beta": neurons.beta, "rule": neurons.rule}
    try:
        results = evaluate(lm.model, lm.tokenizer, examples, methods, out, settings, alpha=ns.alpha)
    except KeyboardInterrupt:
        print(f"interrupted; finished methods are kept in {out / 'results.json'}", file=sys.stderr)
        raise
    records = AttributionStore(paths.store).all()
    top = select_neurons(records, recipe.selection.model_copy(update={"num_neurons": 100})) if records else None
    title = (f"{recipe.name} on {test_name} (h = {len(neurons.neurons)}, beta = {neurons.beta:g}, "
             f"rule = {neurons.rule or 'paper'})")
    report = write_report(results, out, title, neurons=[n.model_dump() for n in top.neurons] if top else None,
                          tune_grid=tune_grid, n_layers=n_layers)
    print(report.read_text())
    print(f"written: {out}")


def cmd_conflicts(ns: argparse.Namespace) -> None:
    from .conflicts import build_conflicts
    from .models import load_model

    from .prompts import QA_TEMPLATE

    lm = load_model(ns.model)
    template = QA_TEMPLATE.model_copy(update={"chat": ns.chat, "system": ns.system})
    report = build_conflicts(lm.model, lm.tokenizer, ns.input, ns.output, template=template, seed=ns.seed)
    _summary("conflicts", {"model": lm.name, "QA rows": report.rows, "conflicts written": report.written,
                           "output": report.output,
                           "dropped": ", ".join(f"{n} {r}" for r, n in report.dropped.items()) or "none",
                           "report": str(Path(report.output).with_name(Path(report.output).stem + ".report.json"))})


def cmd_demo(ns: argparse.Namespace) -> None:
    import json as _json

    from .config import load_recipe
    from .demo import print_demo, run_demo
    from .pipeline import recipe_paths

    recipes = ns.recipe or ["export/smollm2-conflicts.toml", "export/smollm2-counterfact.toml"]
    sets = []
    for r in recipes:
        checkpoint = recipe_paths(load_recipe(r)).output
        if not checkpoint.is_dir():
            raise IrcanError(f"{checkpoint} does not exist; build it with `ircan export {r}`")
        sets.append((checkpoint, r))
    summaries = print_demo(run_demo(sets, base=ns.base))
    if ns.out:
        Path(ns.out).write_text(_json.dumps(summaries, indent=2))
        print(f"written: {ns.out}")


def cmd_bench(ns: argparse.Namespace) -> None:
    from . import bench

    bench.run(ns)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from .config import AttributionConfig, SelectionConfig
    from .models import DTYPES

    parser = argparse.ArgumentParser(prog="ircan", description="IRCAN: find context-aware neurons, "
                                     "export a patched checkpoint, serve it with vLLM.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("attribute", help="score FFN neurons on a conflict data set (resumable)")
    p.add_argument("--model", default="smollm2", help="folder, hub id, .gguf file or 'smollm2'")
    p.add_argument("--data", default="conflicts", help="data file or 'conflicts' (the shipped set)")
    p.add_argument("--format", default="auto", choices=["auto", "generic", "memotrap", "kre", "counterfact"])
    p.add_argument("--store", required=True, help="attribution store folder (resumes if it exists)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights dtype: auto = the checkpoint's on a GPU, float32 on CPU; scores are "
                        "float32 whatever this is")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, or auto (device_map='auto')")
    p.add_argument("--limit", type=int, help="use only the first N rows")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad rows and report them")
    p.add_argument("--workers", type=int, default=1,
                   help="model replicas on Ray (one actor each, one GPU each on a GPU host); needs "
                        "the [ray] extra")
    p.add_argument("--address", help="join this Ray cluster (HOST:PORT, auto, ray://HOST:10001) "
                                     "instead of starting a local one")
    add_config_flags(p, AttributionConfig)
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser("select", help="pick the context-aware neurons from an attribution store")
    p.add_argument("--store", required=True)
    p.add_argument("-o", "--output", help="neurons file (default STORE/neurons.json)")
    p.add_argument("--beta", type=float, help="record this beta in the neurons file")
    add_config_flags(p, SelectionConfig)
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("export", help="write a patched checkpoint (from a recipe: all stages)")
    p.add_argument("recipe", nargs="?", help="export/*.toml recipe: attribute + select + export")
    p.add_argument("--model", help="base model (without a recipe)")
    p.add_argument("--neurons", help="neurons.json (without a recipe)")
    p.add_argument("--num-neurons", type=int, help="use only the first h neurons of the file")
    p.add_argument("--beta", type=float, help="scale factor (overrides the recipe / neurons file)")
    p.add_argument("-o", "--output", help="checkpoint folder")
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("verify", help="check an exported checkpoint's hashes and patched columns")
    p.add_argument("dir")
    p.add_argument("--base", help="base model to compare against (e.g. smollm2)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "serve", help="serve a checkpoint with vLLM's OpenAI server",
        description="Start vLLM's OpenAI-compatible server on an exported checkpoint, wait until "
        "/v1/models answers, print the base URL, stop cleanly on Ctrl-C or SIGTERM. Flags this "
        "command does not know are passed to vLLM (e.g. --tensor-parallel-size 2).",
    )
    p.add_argument("dir", help="exported checkpoint folder (or, with --plain, any model spec)")
    p.add_argument("--plain", action="store_true",
                   help="serve a model without an ircan.json manifest (e.g. the base 'smollm2')")
    from .serving import ServeConfig

    add_config_flags(p, ServeConfig, exclude=("extra_args",))
    p.set_defaults(func=cmd_serve)

    from .config import PAPER_BETA, PAPER_H, SMALL_BETA

    p = sub.add_parser("tune", help="choose the rule, h and beta on the recipe's dev rows (reversible reweighting)")
    p.add_argument("recipe", help="export/*.toml recipe whose attribution store exists")
    p.add_argument("--h", type=int, nargs="+", default=PAPER_H, help="h values (default: the paper's 1..16)")
    p.add_argument("--beta", type=float, nargs="+", default=SMALL_BETA + PAPER_BETA,
                   help="beta values (default: 0, 0.5, 1.5 and the paper's 2..20)")
    p.add_argument("--min-agreement", type=float, default=0.8,
                   help="grid points whose top-1 agreement with the original on prompts without "
                        "context falls below this are collapsed and never chosen")
    p.add_argument("--rule", nargs="+", default=["paper", "signed"], choices=["paper", "signed"],
                   help="reweighting rules to search (default both)")
    p.add_argument("--max-drop", type=float, default=0.02,
                   help="grid points that lose more than this accuracy on the dev rows' locality facts "
                        "or agreeing contexts are collapsed and never chosen")
    p.add_argument("--no-write", dest="write", action="store_false",
                   help="only report; do not write the choice into the recipe")
    p.set_defaults(func=cmd_tune)

    from .config import EVAL_METHODS as METHODS

    p = sub.add_parser("eval", help="compare IRCAN with CAD, prompt baselines and ablations on a test split")
    p.add_argument("recipe", help="the recipe whose attribution store holds neurons.json (after tune)")
    p.add_argument("--test", help="test split file (never the recipe's dev file); default: the "
                   "recipe's own test rows when it has [splits]")
    p.add_argument("--format", default="auto", choices=["auto", "generic", "memotrap", "kre", "counterfact"])
    p.add_argument("--limit", type=int, help="only the first N test rows")
    p.add_argument("--skip-invalid", action="store_true")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--alpha", type=float, default=0.5, help="CAD strength")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the random-neuron ablations")
    p.add_argument("--out", help="output folder (default export/out/NAME.eval-TEST); reruns resume")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "conflicts", help="build a conflict set from your own QA pairs (those the model answers closed-book)",
        description="Read JSONL QA pairs (question, answer, optional passage and kind), ask the model "
        "each question without context, keep the rows it answers, and write generic JSONL whose "
        "context states another answer of the same kind (in the passage, or one sentence), plus "
        "OUTPUT.report.json with every dropped row and why.")
    p.add_argument("input", help="JSONL with question, answer[, passage, kind, id]")
    p.add_argument("-o", "--output", required=True, help="conflict set to write (generic JSONL)")
    p.add_argument("--model", default="smollm2", help="folder, hub id, .gguf file or 'smollm2'")
    p.add_argument("--seed", type=int, default=0, help="seed of the answer substitution")
    p.add_argument("--chat", action="store_true",
                   help="ask the closed-book questions through the model's chat template (instruct "
                        "models; SmolLM2-Instruct ends its turn at once after a bare 'Answer:')")
    p.add_argument("--system", help="system message for --chat")
    p.set_defaults(func=cmd_conflicts)

    p = sub.add_parser("demo", help="RAG demo: original vs patched SmolLM2 behind vLLM, side by side")
    p.add_argument("--recipe", action="append",
                   help="a recipe whose checkpoint (export/out/NAME) is compared on its held-out rows; "
                        "repeat for several (default: smollm2-conflicts and smollm2-counterfact)")
    p.add_argument("--base", default="smollm2", help="the original model to compare with")
    p.add_argument("--out", default="export/out/demo.json", help="where to write the rates and tests (JSON)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="benchmarks (ratios measured in one run)")
    bsub = p.add_subparsers(dest="bench", required=True)
    b = bsub.add_parser("attribution", help="fast vs full-stack vs reference attribution on SmolLM2")
    b.add_argument("--model", default="smollm2")
    b.add_argument("--lengths", type=int, nargs="*", default=[30, 300], help="prompt lengths (tokens)")
    b.add_argument("--data", nargs="*", default=[], metavar="FILE[:K]",
                   help="also time the first K (default 3) rows of a data file, e.g. "
                        "../shared/data/memotrap/...:3")
    b.add_argument("--reference-layers", type=int, default=None,
                   help="score only this many layers (spread over the depth) in both methods; "
                        "default: all for prompts under 100 tokens, 3 above")
    b.add_argument("--n-steps", type=int, default=20)
    b.add_argument("--baseline", metavar="DIR",
                   help="also time the fast path of another checkout (its root, e.g. a `git worktree` of "
                        "an earlier commit) on the --data rows")
    b.add_argument("--pairs", type=int, default=0, metavar="N",
                   help="with --baseline: then N interleaved pairs of fresh processes (baseline, fast) on each "
                        "--data source, and the median of their ratios")
    b.set_defaults(func=cmd_bench)
    b = bsub.add_parser("eval", help="CAD with KV caches vs naive CAD; time of the paper's h x beta grid")
    b.add_argument("--model", default="smollm2")
    b.add_argument("--rows", type=int, default=16, help="prompts for the CAD comparison")
    b.add_argument("--max-tokens", type=int, default=10)
    b.add_argument("--score-rows", type=int, default=200, help="RAG-sized prompts for the scoring pass")
    b.add_argument("--grid-rows", type=int, default=32, help="RAG-sized dev rows for the 4-point grid")
    b.add_argument("--grid-tokens", type=int, default=250, help="tokens per RAG-sized prompt")
    b.set_defaults(func=cmd_bench)
    b = bsub.add_parser("ray", help="attribution in 1 process vs N Ray workers on the same rows")
    b.add_argument("--model", default="smollm2")
    b.add_argument("--rows", type=int, default=24, help="shipped conflict rows")
    b.add_argument("--workers", type=int, default=2)
    b.add_argument("--n-steps", type=int, default=20)
    b.set_defaults(func=cmd_bench)
    b = bsub.add_parser("serve", help="vLLM throughput/latency: patched vs base, wrapper vs raw client")
    b.add_argument("--checkpoint", default="export/out/smollm2-conflicts")
    b.add_argument("--base", default="smollm2")
    b.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    b.add_argument("--max-tokens", type=int, default=32, help="tokens per request (ignore_eos)")
    b.set_defaults(func=cmd_bench)
    return parser


def _vllm_flags_taking_a_value() -> dict[str, bool] | None:
    """vLLM's server options -> whether each takes a value, from vLLM's own parser (None when
    vLLM cannot be imported here)."""
    from .serving import vllm_arg_parser

    try:
        parser = vllm_arg_parser()
    except Exception:  # noqa: BLE001 - any import failure means "ask no one"
        return None
    return {opt: action.nargs != 0 for action in parser._actions for opt in action.option_strings}


def split_serve_args(serve: argparse.ArgumentParser, args: list[str]) -> tuple[list[str], list[str]]:
    """Split ``ircan serve``'s arguments into its own and vLLM's, wherever they are placed:
    ``serve --max-num-seqs 4 DIR`` must not take ``4`` for the folder. Whether an unknown flag
    takes a value is asked of vLLM's own parser (``--flag=value`` needs no asking)."""
    own = {opt: action.nargs != 0 for action in serve._actions for opt in action.option_strings}
    vllm_arity: dict[str, bool] | None = None
    mine: list[str] = []
    passed: list[str] = []
    positional: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        name = token.split("=", 1)[0]
        if token == "--":
            positional += args[i + 1:]
            break
        if not token.startswith("-") or token == "-":
            positional.append(token)
        elif name in own:
            mine.append(token)
            if own[name] and "=" not in token and i + 1 < len(args):
                i += 1
                mine.append(args[i])
        else:
            passed.append(token)
            if "=" not in token and i + 1 < len(args) and not args[i + 1].startswith("-"):
                if vllm_arity is None:
                    vllm_arity = _vllm_flags_taking_a_value() or {}
                if vllm_arity.get(name, True):  # unknown to vLLM too: assume a value follows
                    i += 1
                    passed.append(args[i])
        i += 1
    return positional + mine, passed


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    vllm_args: list[str] = []
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command is not None and argv[command] == "serve":
        serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
        rest, vllm_args = split_serve_args(serve, argv[command + 1:])
        argv = argv[: command + 1] + rest
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    ns.vllm_args = vllm_args
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        ns.func(ns)
    except IrcanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished results are kept and a rerun resumes", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
