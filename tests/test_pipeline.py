"""The stages chained by a recipe: artifacts that stay valid when the project folder moves."""

import shutil

import pytest
import torch

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


def test_a_mix_recipes_dev_and_test_rows_carry_the_irrelevant_check_and_tuning_holds_it(tmp_path, tiny_llama_dir):
    """A recipe with a contexts mix: its dev rows, and its test rows in any format (the one sentence
    included), have the question after other subjects' documents; tuning measures the original
    there and checks every point against it. A sentence-only recipe's rows stay as loaded."""
    from helpers import FIXTURES
    from ircan_serve.config import SelectionConfig, load_recipe
    from ircan_serve.evaluation.tuning import tune
    from ircan_serve.models import load_model
    from ircan_serve.pipeline import in_format, recipe_data
    from ircan_serve.units import Unit, UnitSet

    recipe = tmp_path / "mix.toml"
    recipe.write_text(f'model = "{tiny_llama_dir}"\ndata = "{FIXTURES / "data" / "counterfact-val-head.json"}"\n'
                      'data_format = "counterfact"\nskip_invalid = true\ncontexts = ["sentence", "topk"]\n'
                      '[prompt]\nwith_context = "{context}\\n{question}"\nwithout_context = "{question}"\n'
                      '[splits]\nattribution = 4\ndev = 8\ntest = 6\n')
    lm = load_model(str(tiny_llama_dir))
    mix = load_recipe(recipe)
    split = recipe_data(mix, lm)
    assert all(e.irrelevant_prompt and e.irrelevant_prompt.endswith(e.prompt_without_context) for e in split.dev)
    # the corpus (the retriever's documents, what other formats are built from) is every row as
    # loaded, not the attribution and dev rows as built: a top-k concatenation there could hold a
    # test question's own document and come back as its "irrelevant" context
    built = [e for e in split.attribution + split.dev if "@" in e.id]
    in_splits = [e.id.split("@")[0] for e in split.attribution + split.dev + split.test]
    assert built and [e.id for e in split.corpus][: len(in_splits)] == in_splits
    assert not {e.context for e in built} & {e.context for e in split.corpus}
    for name in ("sentence", "topk"):
        rows = in_format(mix, lm, split.test, split.corpus, name, split.template)
        assert all(e.irrelevant_prompt and e.context not in e.irrelevant_prompt for e in rows), name
    plain = mix.model_copy(update={"contexts": ["sentence"]})
    assert in_format(plain, lm, split.test, split.corpus, "sentence", split.template) == split.test
    assert all(e.irrelevant_prompt for e in in_format(plain, lm, split.test, split.corpus, "topk", split.template))
    units = UnitSet(neurons=[Unit(layer=1, index=i) for i in range(2)], selection=SelectionConfig(num_neurons=2),
                    n_examples=1)
    result = tune(lm.model, lm.tokenizer, units, split.dev, hs=[1], betas=[3.0], rules=["paper"],
                  min_agreement=0.0, max_drop=1.0, progress=False)
    assert result.original_checks.irrelevant is not None and result.grid[0].checks.irrelevant is not None
    # the attribution rows carry the prompt too: tuning checks it on every row not in test, and
    # [attribution] baseline = 'irrelevant' starts each path there
    from ircan_serve.config import AttributionConfig
    from ircan_serve.evaluation.recipe_runs import overall_rows

    checked = overall_rows(split)
    assert len(checked) == 12 and all(e.irrelevant_prompt for e in checked)
    ig = ContextAwareIntegratedGradients(lm.model, lm.tokenizer)
    row = split.attribution[0]
    paths = [ig.attribute(row, AttributionConfig(n_steps=2, baseline=b)) for b in ("no-context", "irrelevant")]
    assert not torch.equal(paths[0].activations_without, paths[1].activations_without)


@pytest.mark.parametrize("command", [["export"], ["tune"], ["eval"], ["demo", "--recipe"]])
def test_a_misspelled_context_format_stops_every_recipe_command_before_a_model_loads(tmp_path, capsys, command):
    """A typo in a recipe's ``contexts`` is named with the file and the formats there are, before
    the model (here a folder that does not exist) is read: not minutes later when rows are built."""
    recipe = tmp_path / "typo.toml"
    recipe.write_text(f'model = "{tmp_path / "no-such-model"}"\ncontexts = ["sentence", "pasage-list"]\n')
    assert main([*command, str(recipe)]) == 2
    err = capsys.readouterr().err
    assert str(recipe) in err and "'pasage-list'" in err and "passage-list" in err.replace("'pasage-list'", "")
    assert "no-such-model" not in err


def test_a_recipe_with_an_unknown_data_format_or_no_contexts_is_refused_with_its_file(tmp_path):
    from ircan_serve.errors import IrcanError
    from ircan_serve.pipeline import read_recipe

    recipe = tmp_path / "r.toml"
    recipe.write_text('data_format = "counterfacts"\n')
    unknown = r"r\.toml: data format 'counterfacts' does not exist; .*counterfact.*formats\.py:FORMATS"
    with pytest.raises(IrcanError, match=unknown):
        read_recipe(recipe)
    recipe.write_text("contexts = []\n")
    with pytest.raises(IrcanError, match=r"(?s)r\.toml is invalid:\n.*contexts\n.*at least 1 item"):
        read_recipe(recipe)
    recipe.write_text('contexts = ["topk", "sentence"]\ndata_format = "counterfact"\n')
    assert read_recipe(recipe).contexts == ["topk", "sentence"]


def test_eval_takes_only_context_formats_the_package_has(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "export/smollm2-counterfact.toml", "--contexts", "top4"])
    assert "invalid choice: 'top4'" in capsys.readouterr().err


def test_dev_contexts_build_the_dev_rows_in_their_own_formats_and_leave_attribution_as_it_was(tmp_path, tiny_llama_dir):
    """A recipe whose units are found on the top 4 and tuned on the top 4 and numbered lists: the
    dev rows come in turn in the two formats, the attribution rows only in ``contexts``, the test
    rows as loaded; the same rows as a recipe whose ``contexts`` were the dev formats."""
    from helpers import FIXTURES
    from ircan_serve.config import load_recipe
    from ircan_serve.data.contexts import format_of
    from ircan_serve.models import load_model
    from ircan_serve.pipeline import recipe_data

    body = (f'model = "{tiny_llama_dir}"\ndata = "{FIXTURES / "data" / "counterfact-val-head.json"}"\n'
            'data_format = "counterfact"\nskip_invalid = true\ncontexts = ["topk"]\n{dev}'
            '[prompt]\nwith_context = "{{context}}\\n{{question}}"\nwithout_context = "{{question}}"\n'
            '[splits]\nattribution = 4\ndev = 6\ntest = 3\n')
    recipe = tmp_path / "r.toml"
    recipe.write_text(body.format(dev='dev_contexts = ["topk", "passage-list"]\n'))
    lm = load_model(str(tiny_llama_dir))
    split = recipe_data(load_recipe(recipe), lm)
    assert [format_of(e) for e in split.attribution] == ["topk"] * 4
    assert [format_of(e) for e in split.dev] == ["topk", "passage-list"] * 3
    assert all(e.agreeing_prompt and e.irrelevant_prompt for e in split.dev)
    recipe.write_text(body.format(dev="").replace('contexts = ["topk"]', 'contexts = ["topk", "passage-list"]'))
    assert recipe_data(load_recipe(recipe), lm).dev == split.dev
    # units found on the one sentence, tuned on the top 4: the attribution rows stay sentences, and
    # still carry the irrelevant documents tuning checks over every row that is not a test row
    recipe.write_text(body.format(dev='dev_contexts = ["topk"]\n').replace('\ncontexts = ["topk"]', '\ncontexts = ["sentence"]'))
    split = recipe_data(load_recipe(recipe), lm)
    assert [format_of(e) for e in split.attribution] == ["sentence"] * 4
    assert [format_of(e) for e in split.dev] == ["topk"] * 6
    assert all(e.irrelevant_prompt for e in split.attribution + split.dev)


@pytest.mark.parametrize(("extra", "problem"), [
    ('dev_contexts = ["topk", "pasage-list"]\n[splits]\nattribution = 1\ndev = 1\n',
     "dev_contexts: context format 'pasage-list' does not exist"),
    ('dev_contexts = ["topk"]\n', r"(?s)is invalid:.*only \[splits\] separates: add \[splits\]"),
    ('dev_contexts = ["topk", "irrelevant"]\n[splits]\nattribution = 1\ndev = 1\n',
     "(?s)is invalid:.*dev_contexts holds 'irrelevant'"),
])
def test_bad_dev_contexts_are_refused_with_the_recipe_file(tmp_path, extra, problem):
    from ircan_serve.errors import IrcanError
    from ircan_serve.pipeline import read_recipe

    recipe = tmp_path / "r.toml"
    recipe.write_text('contexts = ["topk"]\n' + extra)
    with pytest.raises(IrcanError, match=problem) as raised:
        read_recipe(recipe)
    assert "r.toml" in str(raised.value)
