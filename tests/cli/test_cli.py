import json
import subprocess
import sys

import pytest

from ircan_serve import __all__ as public
from ircan_serve.checkpoint.manifest import Manifest
from ircan_serve.cli import main


def test_public_api_is_pinned():
    import ircan_serve

    assert public == sorted([
        "ARCHITECTURES", "ArchitectureLayout", "Attribution", "AttributionConfig", "AttributionStore",
        "ConflictExample", "ContextAwareIntegratedGradients", "IrcanError", "Manifest", "UNIT_KINDS", "Unit",
        "UnitSet", "PromptTemplate", "Recipe", "SelectionConfig", "__version__",
        "apply_reweighting", "attribute_examples", "export_checkpoint", "find_context_neurons",
        "layout_for", "load_examples", "load_model", "load_recipe", "resolve_model", "reweighted",
        "run_recipe", "select_units", "verify_checkpoint",
    ])
    for name in public:
        assert getattr(ircan_serve, name) is not None


def test_help_does_not_import_torch():
    code = "import sys; from ircan_serve.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_recipe_runs_all_stages_and_verifies(tmp_path, tiny_llama_dir, capsys):
    data = tmp_path / "d.jsonl"
    from ircan_serve.data import shipped_conflicts_path

    data.write_text("".join(shipped_conflicts_path().read_text().splitlines(True)[:4]) + '{"context": "x"}\n')
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(f'model = "{tiny_llama_dir}"\ndata = "d.jsonl"\nskip_invalid = true\nbeta = 3.0\n'
                      f'output = "{tmp_path / "ckpt"}"\n[attribution]\nn_steps = 4\n[selection]\nnum_neurons = 2\n')
    assert main(["export", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "checkpoint" in out and "skipped rows" in out
    manifest = Manifest.load(tmp_path / "ckpt")
    assert manifest.beta == 3.0 and len(manifest.neurons) == 2 and manifest.dataset.n_examples == 4
    assert manifest.prompt_template.with_context.startswith("Context:")
    assert main(["verify", str(tmp_path / "ckpt"), "--base", str(tiny_llama_dir)]) == 0
    assert main(["export", str(recipe)]) == 2  # exists, no --force
    assert "already exists" in capsys.readouterr().err


def test_stagewise_commands(tmp_path, tiny_llama_dir):
    store = tmp_path / "store"
    assert main(["attribute", "--model", str(tiny_llama_dir), "--store", str(store), "--limit", "3",
                 "--n-steps", "3"]) == 0
    assert main(["select", "--store", str(store), "--num-neurons", "3", "--beta", "2"]) == 0
    neurons = json.loads((store / "neurons.json").read_text())
    assert len(neurons["neurons"]) == 3 and neurons["beta"] == 2.0
    assert main(["export", "--model", str(tiny_llama_dir), "--neurons", str(store / "neurons.json"),
                 "-o", str(tmp_path / "c")]) == 0
    assert main(["verify", str(tmp_path / "c"), "--base", str(tiny_llama_dir)]) == 0


def test_a_head_out_of_range_in_a_neuron_file_names_the_file(tmp_path, tiny_llama_dir, capsys):
    bad = tmp_path / "mine.json"
    bad.write_text(json.dumps({"neurons": [{"kind": "head", "layer": 0, "index": 9, "scale": 2.0}],
                               "selection": {}, "n_examples": 1, "beta": 2.0}))
    assert main(["export", "--model", str(tiny_llama_dir), "--neurons", str(bad), "-o", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: head h0:9 is out of range: the model has 2 heads per layer" in err
    assert not (tmp_path / "c").exists()


def test_user_errors_exit_2(tmp_path, capsys):
    assert main(["select", "--store", str(tmp_path)]) == 2
    assert "not an attribution store" in capsys.readouterr().err
    assert main(["attribute", "--store", str(tmp_path / "s"), "--n-steps", "0"]) == 2
    assert "n_steps" in capsys.readouterr().err
    assert main(["attribute", "--store", str(tmp_path / "s"), "--baseline", "irrelevant"]) == 2
    assert "recipe" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_split_recipe_export_tune_eval(tmp_path, tiny_llama_dir, capsys):
    """The honest protocol on a tiny model: disjoint attribution / dev / test rows, the recipe's own
    prompt, tune over both rules, eval on the test split with intervals and the paired test."""
    from ircan_serve.config import load_recipe
    from ircan_serve.data import shipped_conflicts_path
    from ircan_serve.models import load_model
    from ircan_serve.pipeline import recipe_data

    data = tmp_path / "d.jsonl"
    data.write_text("".join(shipped_conflicts_path().read_text().splitlines(True)[:12]))
    recipe = tmp_path / "split.toml"
    recipe.write_text(f'model = "{tiny_llama_dir}"\ndata = "d.jsonl"\nbeta = 2.0\noutput = "{tmp_path / "ckpt"}"\n'
                      '[prompt]\nwith_context = "Docs: {context}\\nQ: {question}\\nA:"\nwithout_context = "Q: {question}\\nA:"\n'
                      '[splits]\nattribution = 4\ndev = 3\n[attribution]\nn_steps = 3\n[selection]\nnum_neurons = 2\n')
    r = load_recipe(recipe)
    split = recipe_data(r, load_model(str(tiny_llama_dir)))
    ids = [[e.id for e in part] for part in (split.attribution, split.dev, split.test)]
    assert [len(i) for i in ids] == [4, 3, 5] and len(set(sum(ids, []))) == 12
    assert split.dev[0].prompt.startswith("Docs: ")
    assert main(["export", str(recipe)]) == 0
    manifest = Manifest.load(tmp_path / "ckpt")
    assert manifest.dataset.n_examples == 4 and manifest.prompt_template.with_context.startswith("Docs:")
    assert manifest.rule == "signed" and {n.scale for n in manifest.neurons} <= {2.0, 0.5}
    capsys.readouterr()
    assert main(["tune", str(recipe), "--h", "1", "2", "--beta", "0", "2", "--min-agreement", "0",
                 "--max-drop", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 dev rows (sentence), rows disjoint from the attribution rows" in out and "signed" in out
    assert "chosen:" in out and "over 7 rows: every row not in test" in out
    assert json.loads((tmp_path / "ckpt.attribution" / "tune.json").read_text())["overall_rows"] == 7
    # a fit from the grid's choice starts at the units the recipe exports now, and only reports
    before = recipe.read_text()
    assert main(["tune", str(recipe), "--fit", "--from-choice", "--rank", "efficiency", "--factors", "0", "3",
                 "--max-rounds", "1", "--min-agreement", "0", "--max-drop", "1", "--no-write"]) == 0
    out = capsys.readouterr().out
    fit = json.loads((tmp_path / "ckpt.attribution" / "fit.json").read_text())
    chosen = load_recipe(recipe)
    assert fit["steps"][0]["move"] == "start" and len(fit["steps"]) <= 2
    assert out.startswith("original: dev accuracy") and "\nfrom " in out and recipe.read_text() == before
    assert f"by format {{'sentence': {fit['original']['accuracy']}}} (dev rows in sentence)" in out.splitlines()[0]
    assert fit["steps"][0]["point"]["h"] == chosen.selection.num_neurons  # the grid's h neurons
    assert f"\nfrom {', '.join(fit['steps'][0]['units'])}: dev accuracy" in out
    assert main(["eval", str(recipe), "--methods", "original", "ircan", "erase", "shrink", "--out",
                 str(tmp_path / "ev")]) == 0
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "(5 test rows)" in report and "p = " in report and "| shrink |" in report
    # too few rows for the splits: the error names the file and the counts
    recipe.write_text(recipe.read_text().replace("dev = 3", "dev = 30"))
    assert main(["export", str(recipe), "--force"]) == 2
    err = capsys.readouterr().err
    assert "d.jsonl: 12 usable rows" in err and "4 attribution + 30 dev" in err


def test_dtype_choices_and_checks(tiny_llama_dir, monkeypatch):
    import torch

    from ircan_serve.errors import IrcanError
    from ircan_serve.models import load_model, resolve_dtype

    assert resolve_dtype("auto", "cpu", None) == torch.float32  # auto is float32 on CPU
    assert next(load_model(str(tiny_llama_dir), dtype="bfloat16").model.parameters()).dtype == torch.bfloat16
    with pytest.raises(IrcanError, match="not one of auto, bfloat16"):
        resolve_dtype("float8", "cpu", None)

    def no_half(*args, **kwargs):  # a device without float16 kernels
        raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')

    monkeypatch.setattr(torch.Tensor, "__matmul__", no_half)
    with pytest.raises(IrcanError, match="--dtype float16 does not run on device 'cpu'.*use --dtype float32"):
        resolve_dtype("float16", "cpu", None)


def test_attribute_killed_with_sigkill_then_rerun_gives_the_same_neurons(tmp_path, tiny_llama_dir):
    """`ircan attribute` SIGKILLed mid-run (60 examples), then rerun: the same neurons.json as one
    uninterrupted run (finished examples are kept, the rest computed)."""
    import signal
    import subprocess
    import sys
    import time

    def attribute(store):
        return [sys.executable, "-m", "ircan_serve.cli", "attribute", "--model", str(tiny_llama_dir),
                "--data", "conflicts", "--limit", "60", "--store", str(store)]

    def select(store):
        subprocess.run([sys.executable, "-m", "ircan_serve.cli", "select", "--store", str(store),
                        "--num-neurons", "10", "--beta", "3"], check=True, capture_output=True)
        return (store / "neurons.json").read_text()

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(attribute(whole), check=True, capture_output=True)
    proc = subprocess.Popen(attribute(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((killed / "examples").glob("*.safetensors"))) < 4:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    done = len(list((killed / "examples").glob("*.safetensors")))
    assert 4 <= done < 60, f"{done} records: the kill did not land mid-run"
    rerun = subprocess.run(attribute(killed), check=True, capture_output=True, text=True)
    assert f"resuming: {done} of 60" in rerun.stderr
    assert select(killed) == select(whole)


def test_a_chat_recipe_on_a_tokenizer_without_a_chat_template_names_the_recipe(tmp_path, tiny_llama_dir, capsys):
    recipe = tmp_path / "chatty.toml"
    recipe.write_text(f'model = "{tiny_llama_dir}"\ndata = "conflicts"\nlimit = 4\n'
                      '[prompt]\nwith_context = "{{context}}\\n{{question}}"\nwithout_context = "{{question}}"\n'
                      'chat = true\n')
    assert main(["export", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"{recipe}: [prompt] chat = true, but" in err and "has no chat template" in err
