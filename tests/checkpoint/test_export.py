import json

import pytest
import torch
from safetensors import safe_open

from ircan_serve.checkpoint.export import export_checkpoint
from ircan_serve.checkpoint.manifest import MANIFEST, Manifest
from ircan_serve.checkpoint.verify import verify_checkpoint
from ircan_serve.config import SelectionConfig
from ircan_serve.errors import IrcanError
from ircan_serve.models import load_model
from ircan_serve.reweight import reweighted
from ircan_serve.units import Unit, UnitSet

NEURONS = UnitSet(
    neurons=[Unit(layer=1, index=5, count=3), Unit(layer=0, index=9, count=2),
             Unit(layer=1, index=200, count=1)],
    selection=SelectionConfig(num_neurons=3), n_examples=4,
)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_exported_checkpoint_equals_in_memory_reweighting(tmp_path, tiny_model_dirs, family):
    base = tiny_model_dirs[family]
    out = tmp_path / "patched"
    manifest = export_checkpoint(str(base), NEURONS, 4.0, out, base_model="tiny")
    assert (out / MANIFEST).is_file() and manifest.beta == 4.0
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (out / name).is_file()

    base_lm = load_model(str(base))
    patched = load_model(str(out))
    ids = base_lm.tokenizer("Context: Lyon is the capital.\nQuestion: capital?\nAnswer:", return_tensors="pt")
    with torch.no_grad():
        with reweighted(base_lm.model, NEURONS, 4.0):
            expected = base_lm.model(**ids).logits
        original = base_lm.model(**ids).logits
        got = patched.model(**ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, original)

    report = verify_checkpoint(out, base=str(base))
    assert report.ok, report.problems
    assert report.columns_checked == 3 and report.tensors_compared > 10


def test_only_listed_columns_change_by_beta(tmp_path, tiny_llama_dir):
    out = tmp_path / "p"
    export_checkpoint(str(tiny_llama_dir), NEURONS, 0.0, out)
    with safe_open(str(out / "model.safetensors"), "pt") as f, \
         safe_open(str(tiny_llama_dir / "model.safetensors"), "pt") as g:
        assert set(f.keys()) == set(g.keys())
        for key in f.keys():
            a, b = f.get_tensor(key), g.get_tensor(key)
            if key == "model.layers.1.mlp.down_proj.weight":
                changed = (a != b).any(dim=0).nonzero().flatten().tolist()
                assert changed == [5, 200] and a[:, 5].abs().sum() == 0  # beta = 0 erases
            elif key == "model.layers.0.mlp.down_proj.weight":
                assert (a != b).any(dim=0).nonzero().flatten().tolist() == [9]
            else:
                assert torch.equal(a, b), key
        assert json.loads(f.metadata()["ircan_units"]) == [["neuron", 1, 5, 0.0], ["neuron", 0, 9, 0.0],
                                                            ["neuron", 1, 200, 0.0]]


def test_verify_detects_tampering(tmp_path, tiny_llama_dir):
    out = tmp_path / "p"
    export_checkpoint(str(tiny_llama_dir), NEURONS, 2.0, out)
    manifest = Manifest.load(out)
    # same bytes, a wrong factor claimed for one neuron: hashes pass, the column check fails
    wrong = [manifest.neurons[0].model_copy(update={"scale": 3.0}), *manifest.neurons[1:]]
    (out / MANIFEST).write_text(manifest.model_copy(update={"neurons": wrong}).model_dump_json())
    report = verify_checkpoint(out, base=str(tiny_llama_dir))
    assert not report.ok and any("not base x beta" in p for p in report.problems)
    # a format-1 manifest (no scale per neuron) is checked against its beta
    legacy = [n.model_copy(update={"scale": None}) for n in manifest.neurons]
    (out / MANIFEST).write_text(manifest.model_copy(update={"neurons": legacy}).model_dump_json())
    assert verify_checkpoint(out, base=str(tiny_llama_dir)).ok
    (out / MANIFEST).write_text(manifest.model_copy(update={"neurons": legacy, "beta": 3.0}).model_dump_json())
    assert not verify_checkpoint(out, base=str(tiny_llama_dir)).ok
    # a changed weight file fails the hash check
    (out / MANIFEST).write_text(manifest.model_dump_json())
    with (out / "model.safetensors").open("r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x01\x02\x03")
    assert any("sha256" in p for p in verify_checkpoint(out).problems)


def test_existing_folder_needs_force(tmp_path, tiny_llama_dir):
    out = tmp_path / "p"
    export_checkpoint(str(tiny_llama_dir), NEURONS, 2.0, out)
    with pytest.raises(IrcanError, match="already exists; pass --force"):
        export_checkpoint(str(tiny_llama_dir), NEURONS, 3.0, out)
    assert Manifest.load(out).beta == 2.0
    export_checkpoint(str(tiny_llama_dir), NEURONS, 3.0, out, force=True)
    assert Manifest.load(out).beta == 3.0


def test_failed_export_leaves_nothing(tmp_path, tiny_llama_dir):
    bad = NEURONS.model_copy(update={"neurons": [Unit(layer=7, index=0)]})
    with pytest.raises(IrcanError, match="the model has 2"):
        export_checkpoint(str(tiny_llama_dir), bad, 2.0, tmp_path / "p")
    assert list(tmp_path.iterdir()) == []


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(IrcanError, match="not an exported IRCAN checkpoint"):
        verify_checkpoint(tmp_path)


def test_signed_scales_are_exported_and_verified(tmp_path, tiny_llama_dir):
    from ircan_serve.models import load_model

    signed = UnitSet(neurons=[Unit(layer=0, index=9, effect=0.3), Unit(layer=1, index=5, effect=-0.2),
                                Unit(layer=1, index=200, effect=0.1)],
                       selection=SelectionConfig(num_neurons=3), n_examples=1).scaled(4.0, "signed")
    assert signed.scales() == [4.0, 0.25, 4.0]
    out = tmp_path / "s"
    manifest = export_checkpoint(str(tiny_llama_dir), signed, None, out)
    assert manifest.rule == "signed" and [n.scale for n in manifest.neurons] == [4.0, 0.25, 4.0]
    with safe_open(str(out / "model.safetensors"), "pt") as f, \
         safe_open(str(tiny_llama_dir / "model.safetensors"), "pt") as g:
        a, b = f.get_tensor("model.layers.1.mlp.down_proj.weight"), g.get_tensor("model.layers.1.mlp.down_proj.weight")
        torch.testing.assert_close(a[:, 5], b[:, 5] * 0.25)
        torch.testing.assert_close(a[:, 200], b[:, 200] * 4.0)
    assert verify_checkpoint(out, base=str(tiny_llama_dir)).ok
    patched, base = load_model(str(out)), load_model(str(tiny_llama_dir))
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with reweighted(base.model, signed):
        torch.testing.assert_close(base.model(ids).logits, patched.model(ids).logits)
    with pytest.raises(IrcanError, match="signed rule needs beta > 0"):
        signed.scaled(0.0, "signed")
    with pytest.raises(IrcanError, match="no effect recorded"):
        NEURONS.scaled(2.0, "signed")


def test_checkpoint_without_base_model_prefix(tmp_path, tiny_model_dirs):
    """The original GPT-2 checkpoint stores `h.0.mlp.c_proj.weight`, without `transformer.`."""
    import shutil

    from safetensors.torch import load_file, save_file

    base = tmp_path / "gpt2-bare"
    shutil.copytree(tiny_model_dirs["gpt2"], base)
    tensors = load_file(str(base / "model.safetensors"))
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items() if k != "lm_head.weight"}
    assert "h.1.mlp.c_proj.weight" in bare
    save_file(bare, str(base / "model.safetensors"), metadata={"format": "pt"})
    neurons = UnitSet(neurons=[Unit(layer=1, index=7)], selection=SelectionConfig(num_neurons=1), n_examples=1)
    out = tmp_path / "p"
    export_checkpoint(str(base), neurons, 3.0, out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        patched = f.get_tensor("h.1.mlp.c_proj.weight")
    torch.testing.assert_close(patched[7], bare["h.1.mlp.c_proj.weight"][7] * 3.0)
    assert verify_checkpoint(out, base=str(base)).ok
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    base_lm = load_model(str(base))
    with reweighted(base_lm.model, neurons, 3.0):
        torch.testing.assert_close(base_lm.model(ids).logits, load_model(str(out)).model(ids).logits)


def test_sharded_bfloat16_base_keeps_dtype_shards_and_index(tmp_path, tiny_llama_dir):
    """A base saved in bfloat16 over several shards: the export has the same shard files, the
    index, bfloat16 tensors, and reloads as the base reweighted in memory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    model.save_pretrained(base, max_shard_size="300KB")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(base)
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 1 and (base / "model.safetensors.index.json").is_file()
    out = tmp_path / "patched"
    export_checkpoint(str(base), NEURONS, 3.0, out)
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert json.loads((out / "model.safetensors.index.json").read_text()) == \
        json.loads((base / "model.safetensors.index.json").read_text())
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    patched = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad(), reweighted(model, NEURONS, 3.0):
        expected = model(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(patched(ids).logits, expected, rtol=0, atol=0)
    assert verify_checkpoint(out, base=str(base)).ok


def test_bin_only_checkpoint_is_refused_with_the_conversion(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "legacy"  # the pre-safetensors layout (transformers 5 no longer writes it)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    base.mkdir()
    model.config.save_pretrained(base)
    torch.save(model.state_dict(), base / "pytorch_model.bin")
    assert not list(base.glob("*.safetensors")) and (base / "pytorch_model.bin").is_file()
    with pytest.raises(IrcanError, match=r"only pytorch_model\.bin.*safetensors only.*save_pretrained"):
        export_checkpoint(str(base), NEURONS, 3.0, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _tree(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_failed_write_leaves_the_old_checkpoint_intact(tmp_path, tiny_llama_dir, monkeypatch, fault):
    """A disk that fills up while a weight shard is written, or a folder that cannot be written:
    a clear error, no partial folder, and the checkpoint already there is unchanged."""
    import errno
    import os
    from pathlib import Path

    import safetensors.torch

    out = tmp_path / "ckpt"
    export_checkpoint(str(tiny_llama_dir), NEURONS, 2.0, out)
    before = _tree(out)
    written = []
    if fault == "full":

        def no_space(tensors, filename, metadata=None):  # the disk fills up in the first shard
            written.append(Path(filename).name)
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

        monkeypatch.setattr(safetensors.torch, "save_file", no_space)
        match = "No space left on device.*existing checkpoint there is intact"
    else:
        real_mkdir = Path.mkdir

        def read_only(self, *a, **k):
            if self.name.endswith(".tmp"):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            return real_mkdir(self, *a, **k)

        monkeypatch.setattr(Path, "mkdir", read_only)
        match = "Read-only file system.*writable folder"
    with pytest.raises(IrcanError, match=match):
        export_checkpoint(str(tiny_llama_dir), NEURONS, 5.0, out, force=True)
    assert written == (["model.safetensors"] if fault == "full" else [])  # it failed on a shard, not later
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .tmp / .old left


def test_a_failed_swap_puts_the_old_checkpoint_back(tmp_path, tiny_llama_dir, monkeypatch):
    """The new folder is complete but cannot be renamed into place: the old checkpoint, already
    moved aside, goes back, and nothing else is left."""
    import errno
    from pathlib import Path

    out = tmp_path / "ckpt"
    export_checkpoint(str(tiny_llama_dir), NEURONS, 2.0, out)
    before = _tree(out)
    real_rename = Path.rename

    def refuse_new(self, target):
        if self.name == ".ckpt.tmp":
            raise OSError(errno.EIO, "I/O error", str(self))
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", refuse_new)
    with pytest.raises(IrcanError, match="I/O error.*existing checkpoint there is intact"):
        export_checkpoint(str(tiny_llama_dir), NEURONS, 5.0, out, force=True)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_an_export_killed_between_its_renames_is_recovered(tmp_path, tiny_llama_dir):
    """Killed after moving the old checkpoint aside and before renaming the new one in: only
    ``.NAME.old`` (and the finished ``.NAME.tmp``) are left. The next export puts the old one back
    before it checks the folder, and replaces it only with --force."""
    out = tmp_path / "ckpt"
    export_checkpoint(str(tiny_llama_dir), NEURONS, 2.0, out)
    before = _tree(out)
    out.rename(tmp_path / ".ckpt.old")  # the state the kill leaves
    (tmp_path / ".ckpt.tmp").mkdir()
    with pytest.raises(IrcanError, match="already exists; pass --force"):
        export_checkpoint(str(tiny_llama_dir), NEURONS, 5.0, out)
    assert _tree(out) == before and not (tmp_path / ".ckpt.old").exists()
    export_checkpoint(str(tiny_llama_dir), NEURONS, 5.0, out, force=True)
    assert Manifest.load(out).beta == 5.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.e2e
def test_recipe_export_reloads_with_reweighted_logits(patched_smollm2, smollm2):
    manifest = Manifest.load(patched_smollm2)
    assert manifest.base_model == "smollm2" and manifest.dataset.n_examples == 48
    report = verify_checkpoint(patched_smollm2, base="smollm2")
    assert report.ok, report.problems
    assert report.columns_checked == len(manifest.neurons)

    patched = load_model(str(patched_smollm2))
    neurons = UnitSet(neurons=manifest.neurons, selection=manifest.selection, n_examples=1,
                        beta=manifest.beta)
    ids = smollm2.tokenizer(manifest.prompt_template.render(
        "Which country is the most populous in the world?",
        "As of 2023, India is the most populous country in the world."), return_tensors="pt")
    with torch.no_grad():
        with reweighted(smollm2.model, neurons):
            expected = smollm2.model(**ids).logits
        got = patched.model(**ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_export_writes_a_model_card(tmp_path, tiny_llama_dir):
    """README.md with the Hub's front matter (base model, the base's licence, tags), the units and
    their factors, the data, how to serve it; figures when an evaluation is given."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    (base / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    figures = {"rows": 12, "where": "test split", "methods": [
        {"method": "original", "accuracy": 0.25, "ci": [0.09, 0.53], "difference": None, "p_value": None},
        {"method": "ircan", "accuracy": 0.5, "ci": [0.25, 0.75], "difference": 0.25, "p_value": 0.031}]}
    out = tmp_path / "p"
    export_checkpoint(str(base), NEURONS, 3.0, out, base_model="tiny-base", figures=figures)
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "base_model: tiny-base" in front and "license: mit" in front and "- ircan" in front
    assert "| neuron | 1 | 5 | x3 |" in card and "ircan serve p" in card and "vllm serve ./p" in card
    assert "| ircan | 0.500 | [0.250, 0.750] | +0.250 (p = 0.031) |" in card
    assert verify_checkpoint(out, base=str(base)).ok
    plain = tmp_path / "q"
    export_checkpoint(str(tiny_llama_dir), NEURONS, 3.0, plain)
    assert "license: other" in (plain / "README.md").read_text()
    assert "Not evaluated" in (plain / "README.md").read_text()
