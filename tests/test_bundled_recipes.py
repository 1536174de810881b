"""Recipes ship in the package and resolve by name wherever a CONFIG is taken."""

from pathlib import Path

import pytest

from fedtune import bundled_recipes
from fedtune.bundled_recipes import RECIPES_DIR, catalog, copy, names, resolve
from fedtune.config import load_config
from fedtune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_every_recipe_has_a_one_line_description():
    rows = dict(catalog())
    assert set(rows) == {p.stem for p in RECIPES_DIR.glob("*.yaml")} and "demo" in rows
    for name, text in rows.items():
        assert 20 <= len(text) <= 100 and text.endswith("."), (name, text)
    assert rows["dpo-after-sft"].startswith("Federated DPO")


def test_the_clones_configs_folder_is_the_same_files():
    """One source of truth: configs/ (README examples in a clone) links to the packaged recipes."""
    assert (ROOT / "configs").resolve() == RECIPES_DIR.resolve()


def test_a_name_resolves_to_the_bundled_recipe_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve("demo") == resolve("demo.yaml") == RECIPES_DIR / "demo.yaml"
    assert load_config("demo", ["federation.rounds=1"]).federation.rounds == 1


def test_a_real_file_wins_over_a_recipe_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("demo.yaml").write_text("seed: 7\n")
    assert load_config("demo.yaml").seed == 7
    assert load_config("demo").seed == 0  # no file called "demo": the recipe


def test_an_unknown_name_fails_with_one_line_listing_the_recipes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config("demoo")
    message = str(err.value)
    assert "\n" not in message and "config file demoo not found" in message and ", ".join(names()) in message
    with pytest.raises(ConfigError, match=r"the bundled one is `demo`"):  # a clone's path, outside a clone
        load_config("configs/demo.yaml")


def test_copy_writes_an_editable_recipe_and_never_overwrites(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    written = copy("demo")
    assert written == Path("demo.yaml") and written.read_text() == (RECIPES_DIR / "demo.yaml").read_text()
    with pytest.raises(ConfigError, match="demo.yaml already exists"):
        copy("demo.yaml")
    (tmp_path / "mine").mkdir()
    assert copy("fedprox", "mine") == Path("mine/fedprox.yaml")
    assert copy("fedprox", "mine/other.yaml").is_file()
    with pytest.raises(ConfigError, match="no bundled recipe 'nope'; the recipes are: alpaca"):
        copy("nope")
    with pytest.raises(ConfigError, match="is not a folder"):
        copy("demo", "missing/dir/x.yaml")


def test_recipe_descriptions_skip_blank_comment_lines(tmp_path, monkeypatch):
    (tmp_path / "a.yaml").write_text("#\n#  First line.\n# more\nseed: 0\n")
    (tmp_path / "b.yaml").write_text("seed: 0\n# not a header\n")
    monkeypatch.setattr(bundled_recipes, "RECIPES_DIR", tmp_path)
    assert catalog() == [("a", "First line."), ("b", "")]
