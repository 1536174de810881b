"""`fedtune recipes`, `fedtune recipes copy` and `fedtune config`, and recipe names as CONFIG,
through the real command in an empty directory."""

import os
import subprocess
import sys

import pytest
import yaml

from fedtune.bundled_recipes import names
from fedtune.config import load_config, to_dict
from tests.test_cli import assert_one_line_error, fedtune


@pytest.fixture(autouse=True)
def absolute_pythonpath(monkeypatch):
    """The commands run in other directories: a relative PYTHONPATH (src) must still find this checkout."""
    if os.environ.get("PYTHONPATH"):
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(os.path.abspath(p) for p in os.environ["PYTHONPATH"].split(os.pathsep)))


def test_recipes_lists_names_and_descriptions(tmp_path):
    proc = fedtune("recipes", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert all(name in proc.stdout for name in names())
    assert "The demo: 10 non-IID clients" in proc.stdout


def test_recipes_copy_then_run_commands_take_the_copy_or_the_name(tmp_path):
    copied = fedtune("recipes", "copy", "demo", cwd=tmp_path)
    assert copied.returncode == 0 and (tmp_path / "demo.yaml").is_file(), copied.stderr
    assert_one_line_error(fedtune("recipes", "copy", "demo", cwd=tmp_path), 2, "demo.yaml already exists")
    assert_one_line_error(fedtune("recipes", "copy", "nope", cwd=tmp_path), 2, "no bundled recipe 'nope'", "demo-compare")

    (tmp_path / "demo.yaml").write_text((tmp_path / "demo.yaml").read_text().replace("seed: 0", "seed: 5"))
    mine = fedtune("validate", "demo.yaml", cwd=tmp_path)  # the real file wins
    bundled = fedtune("validate", "fedprox", "federation.rounds=1", cwd=tmp_path)
    assert mine.returncode == bundled.returncode == 0, mine.stderr + bundled.stderr
    assert "seed: 5" in mine.stdout and "name: fedprox" in bundled.stdout
    assert_one_line_error(fedtune("data", "demoo", cwd=tmp_path), 2, "config file demoo not found", "dpo-after-sft")


def test_config_prints_the_commented_tree_or_a_section(tmp_path):
    whole = fedtune("config", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    assert yaml.safe_load(whole.stdout) == to_dict(load_config(None))
    section = fedtune("config", "demo", "lora", "lora.r=4", cwd=tmp_path)
    assert section.returncode == 0, section.stderr
    assert yaml.safe_load(section.stdout) == {"lora": to_dict(load_config("demo", ["lora.r=4"]))["lora"]}
    assert "# LoRA rank; > 0; default: 8\n  r: 4" in section.stdout
    only = fedtune("config", "partition", cwd=tmp_path)
    assert only.returncode == 0 and only.stdout.startswith("partition:\n"), only.stderr
    assert_one_line_error(fedtune("config", "lorra", cwd=tmp_path), 2, "no config section 'lorra' (did you mean 'lora'?)")


def test_run_help_names_recipes_and_fedtune_config():
    proc = fedtune("run", "--help")
    assert proc.returncode == 0 and "fedtune config" in proc.stdout and "fedtune recipes" in proc.stdout


def test_help_and_import_stay_light():
    """`import fedtune` and `fedtune --help` import neither torch nor transformers."""
    code = ("import sys, fedtune; fedtune.__version__; sys.argv = ['fedtune', '--help']\n"
            "from fedtune.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("[]"), proc.stdout + proc.stderr
