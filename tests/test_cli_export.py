"""`fedtune export` and `fedtune generate` on shared folders, through the real command."""

from __future__ import annotations

import shutil

from tests.test_cli import assert_one_line_error, fedtune


def test_export_shows_phases_and_generate_reads_every_folder_kind(finished_run, tmp_path):
    proc = fedtune("export", finished_run, "--out", tmp_path / "merged")
    assert proc.returncode == 0, proc.stderr
    assert "exported:" in proc.stdout and all(w in proc.stderr for w in ("loading", "merging", "writing"))
    shutil.copytree(finished_run / "adapter", tmp_path / "adapter")
    answers = {str(p): fedtune("generate", p, "Name a color.", "--max-new-tokens", "4")
               for p in (finished_run, tmp_path / "adapter", tmp_path / "merged")}
    for p, a in answers.items():
        assert a.returncode == 0, (p, a.stderr)
    assert len({a.stdout for a in answers.values()}) == 1
    assert_one_line_error(fedtune("generate", tmp_path / "merged", "x", "--base"), 2, "is a merged model")


def test_export_errors_are_one_line(finished_run, tmp_path):
    assert_one_line_error(fedtune("export", tmp_path / "nope", "--out", tmp_path / "o"), 4, "does not exist")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(finished_run / "config.yaml", unfinished / "config.yaml")
    assert_one_line_error(fedtune("export", unfinished, "--out", tmp_path / "o"), 4, "has not finished", "fedtune run --resume")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    assert_one_line_error(fedtune("export", finished_run, "--out", tmp_path / "taken"), 2, "already exists", "--overwrite")
    (tmp_path / "file").write_text("")
    assert_one_line_error(fedtune("export", finished_run, "--out", tmp_path / "file" / "o"), 4, "cannot write to")
    # bad --format/--dtype and --overwrite of a foreign folder: tests/model/test_export.py
