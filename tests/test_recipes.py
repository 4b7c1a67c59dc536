"""The shipped recipes (``export/*.toml``): each one reads as a valid recipe, names formats the
package has, and is listed in ``export/README.md``'s table."""

from __future__ import annotations

from pathlib import Path

import pytest

from ircan_serve.pipeline import read_recipe

EXPORT = Path(__file__).resolve().parents[1] / "export"
RECIPES = sorted(EXPORT.glob("*.toml"))


def test_recipes_are_shipped():
    assert len(RECIPES) >= 8, RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_reads_and_names_known_formats(path: Path):
    recipe = read_recipe(path)  # refuses a data format or context format the tables lack
    assert recipe.name == path.stem
    if recipe.selection.num_heads:
        assert "head" in recipe.attribution.units, f"{path.name} selects heads it never attributes"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_in_the_export_readme(path: Path):
    table = [line for line in (EXPORT / "README.md").read_text().splitlines() if line.startswith("| `")]
    assert any(line.startswith(f"| `{path.name}`") for line in table), f"export/README.md does not list {path.name}"
