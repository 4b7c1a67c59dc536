"""The stages chained by a recipe: artifacts that stay valid when the project folder moves."""

import shutil

import pytest

from helpers import write_jsonl
from ircan_serve.attribution import ContextAwareIntegratedGradients
from ircan_serve.cli import main
from ircan_serve.data import shipped_conflicts_path


def test_a_store_resumes_after_the_project_folder_moves(tmp_path, tiny_llama_dir, monkeypatch):
    """A recipe built in one folder, then the whole project moved: the store, the manifest and the
    neuron file hold no path of the first folder, and the moved store resumes (nothing is
    attributed again)."""
    project = tmp_path / "first"
    (project / "export").mkdir(parents=True)
    rows = [line for line in shipped_conflicts_path().read_text().splitlines() if line.strip()][:5]
    (project / "data").mkdir()
    write_jsonl(project / "data" / "d.jsonl", rows)
    (project / "export" / "tiny.toml").write_text(
        f'model = "{tiny_llama_dir}"\ndata = "../data/d.jsonl"\nbeta = 2.0\n'
        "[attribution]\nn_steps = 3\n[selection]\nnum_neurons = 2\n")
    monkeypatch.chdir(project)
    assert main(["export", "export/tiny.toml"]) == 0
    written = [p for p in (project / "export" / "out").rglob("*.json")]
    assert {p.name for p in written} >= {"header.json", "neurons.json", "ircan.json"}
    for path in written:
        assert str(project) not in path.read_text(), path

    moved = tmp_path / "second"
    shutil.move(project, moved)
    monkeypatch.chdir(moved)
    monkeypatch.setattr(ContextAwareIntegratedGradients, "attribute",
                        lambda *_a, **_k: pytest.fail("a moved store must resume, not attribute again"))
    assert main(["export", "export/tiny.toml", "--force"]) == 0
    assert (moved / "export" / "out" / "tiny" / "ircan.json").is_file()
