import os
import re
import subprocess
import sys

import pytest

from fedtune.config import JudgeConfig
from fedtune.evaluation.evaluate import judge_answers
from fedtune.evaluation.grading import Question
from fedtune.evaluation.judge_table import HEADERS, cells, fedit_rows, unparsed_note
from fedtune.reporting.report import judge_parts


def graded(ratings_a, ratings_ref, outcomes_a):
    """A grade() result for one model "a" (relative_score/win_tie_loss by hand)."""
    pairs = [(c, r) for c, r in zip(ratings_a, ratings_ref) if c is not None and r is not None]
    rated = [c for c in ratings_a if c is not None]
    return {
        "reference_ratings": ratings_ref,
        "models": {"a": {
            "single": {"mean": sum(rated) / len(rated), "relative": sum(c for c, _ in pairs) / sum(r for _, r in pairs),
                       "pairs": len(pairs), "unparsed": sum(c is None for c in ratings_a), "ratings": ratings_a},
            "pairwise": {"win": outcomes_a.count("win"), "tie": outcomes_a.count("tie"), "loss": outcomes_a.count("loss"),
                         "unparsed": outcomes_a.count(None), "outcomes": outcomes_a},
        }},
    }


def test_fedit_rows_relative_score_win_tie_loss_and_missing_ratings():
    # Arrange: a rated 6, 8, (unparsed), 5; the reference 8, 8, 9, (unparsed) -> both parsed on questions 1-2 only
    g = graded([6.0, 8.0, None, 5.0], [8.0, 8.0, 9.0, None], ["win", "tie", None, "loss"])

    # Act
    rows = fedit_rows(g["models"], g["reference_ratings"], "data")

    # Assert: relative = (6 + 8) / (8 + 8) = 87.5%; the reference row is 100% by definition
    assert [cells(r) for r in rows] == [
        ["a", "87.5%", "6.33", "2", "1", "1", "1", "1", "1"],
        ["reference answers (data)", "100.0%", "8.33", "3", "1", "-", "-", "-", "-"],
    ]
    assert len(HEADERS) == len(cells(rows[0]))
    assert unparsed_note(rows).startswith("2 rating(s) and 1 verdict(s) from the judge were in no readable format")
    assert unparsed_note(fedit_rows(graded([5.0], [5.0], ["tie"])["models"], [5.0], "centralized")) is None
    assert fedit_rows(g["models"], [], "centralized")[-1]["model"] == "a"  # pairwise only: no reference row


@pytest.fixture
def served_judge(finished_run):
    """`fedtune serve` in its own process on 127.0.0.1 (a free port), stopped by pid."""
    env = {**os.environ, "COLUMNS": "300"}
    proc = subprocess.Popen([sys.executable, "-m", "fedtune.cli", "serve", str(finished_run), "--port", "0", "--name", "judge"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        url = None
        for line in proc.stderr:  # the first line says where it listens
            found = re.search(r"http://127\.0\.0\.1:\d+/v1", line)
            if found:
                url = found.group(0)
                break
        assert url is not None, "fedtune serve did not start"
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_fedit_table_and_figure_with_fedtune_serve_as_the_judge(served_judge, tmp_path, capsys, monkeypatch):
    # Arrange: two models' answers to two questions; the served tiny model judges (its scores mean nothing)
    questions = [Question("What is 2 + 3?", "5"), Question("Name the capital of France.", "Paris")]
    answers = {"federated": ["5", "Paris"], "local-0": ["7", "Rome"]}
    judge = JudgeConfig(base_url=served_judge, model="judge", max_tokens=8, requests_per_second=1000.0, max_retries=0,
                        cache_dir=str(tmp_path / "cache"))

    # Act
    result = judge_answers(judge, questions, answers)
    comp = {"judge": result["models"], "judge_reference_ratings": result["reference_ratings"], "judge_reference": "data",
            "judge_note": "judge judge"}
    parts = judge_parts(comp, tmp_path)
    from rich.console import Console

    from fedtune import cli

    monkeypatch.setattr(cli, "out", Console(width=250))
    cli._show_judge(comp, tmp_path)
    printed = capsys.readouterr().out

    # Assert: every rating is either parsed or counted as unparsed; the table and the figure are there
    # reference ratings; per model a rating and two verdicts (federated's answers are the references: some repeat, cached)
    assert result["client"]["requests"] + result["client"]["cached"] == 2 * (1 + 2 * 3)
    rows = fedit_rows(comp["judge"], comp["judge_reference_ratings"], "data")
    assert [r["model"] for r in rows] == ["federated", "local-0", "reference answers (data)"]
    for r in rows[:2]:
        assert r["unparsed_ratings"] + sum(x is not None for x in comp["judge"][r["model"]]["single"]["ratings"]) == 2
        assert r["win"] + r["tie"] + r["loss"] + r["unparsed_verdicts"] == 2
    assert (tmp_path / "judge.png").stat().st_size > 1000 and 'src="judge.png"' in "".join(parts)
    assert "LLM judge against reference answers (data) (FedIT format)" in printed and "relative score" in printed
    assert "federated" in printed and f"judge figure: {tmp_path / 'judge.png'}" in printed
    if any(r["unparsed_ratings"] or r["unparsed_verdicts"] for r in rows):
        assert "no readable format" in printed
