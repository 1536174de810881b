import re
import shutil

import pytest

from fedtune.errors import CheckpointError
from fedtune.reporting.report import comparison_report, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def images_of(report):
    """The PNGs a report links to: each must exist beside it and be a non-empty PNG."""
    srcs = re.findall(r'<img src="([^"]+)"', report.read_text())
    for src in srcs:
        path = report.parent / src
        assert "/" not in src and path.is_file(), src
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) > 2000, src
    return srcs


def test_a_finished_run_has_a_report_with_its_figures(finished_run, tmp_path):
    # Arrange: the run wrote its report when it finished; redraw it in a copy
    run = shutil.copytree(finished_run, tmp_path / "run")
    assert (run / "report.html").is_file()
    for png in run.glob("*.png"):
        png.unlink()

    # Act
    report = write_report(run)

    # Assert
    assert set(images_of(report)) == {"loss_per_round.png", "loss_per_category.png", "participation.png", "partition.png"}
    html = report.read_text()
    assert "sample answers" in html and "held-out loss, round 1" in html and "<script" not in html


def heldout(loss):
    return {"loss": loss, "ppl": 2.718 ** loss, "examples": 4,
            "per_category": {"a": {"loss": loss - 0.1, "ppl": 1.0, "examples": 2}, "b": {"loss": loss + 0.1, "ppl": 1.0, "examples": 2}}}


def generation(rouge):
    return {"rouge_l": rouge, "exact_match": 0.5, "examples": 2,
            "per_category": {"a": {"rouge_l": rouge, "exact_match": 1.0, "examples": 1}, "b": {"rouge_l": 0.0, "exact_match": 0.0, "examples": 1}}}


def test_comparison_report_from_a_comparison_record(tmp_path):
    # Arrange: a hand-written comparison.json-style record with a judge section and an answer to escape
    models = ["base", "federated"]
    comp = {
        "name": "cmp", "description": "two models", "budget_note": "equal budgets", "models": models,
        "heldout": {"base": heldout(3.0), "federated": heldout(2.0)},
        "generation": {"base": generation(0.1), "federated": generation(0.6)},
        "judge": {"base": {"single": {"mean": 3.0, "relative": 0.4, "unparsed": 0}, "pairwise": {"win": 0, "tie": 1, "loss": 1, "unparsed": 0}},
                  "federated": {"single": {"mean": 7.0, "relative": 0.9, "unparsed": 1}, "pairwise": {"win": 1, "tie": 1, "loss": 0, "unparsed": 0}}},
        "judge_note": "judge x", "budget": {"base": {"optimizer_steps": 0}, "federated": {"optimizer_steps": 12, "tokens": 300}},
        "curves": {"base": [[0, 3.0], [2, 3.0]], "federated": [[0, 3.0], [1, 2.4], [2, 2.0]]},
        "participation": [[1, [0, 1]], [2, [1, 2]]],
        "partition": {"method": "shards", "num_clients": 3, "categories": {"0": {"a": 3}, "1": {"a": 1, "b": 2}, "2": {"b": 3}}, "holdout": 4},
        "samples": [{"prompt": "Say <b>hi</b>", "input": "", "reference": "hi", "category": "a",
                     "answers": {"base": "<script>x</script>", "federated": "hi"}}],
    }

    # Act
    report = comparison_report(tmp_path, comp)

    # Assert
    assert set(images_of(report)) == {"loss_per_round.png", "loss_per_category.png", "rouge_per_category.png",
                                      "participation.png", "partition.png", "judge.png"}
    html = report.read_text()
    assert "&lt;script&gt;x&lt;/script&gt;" in html and "<script>" not in html  # answers are escaped
    assert "LLM judge" in html and "90.0%" in html  # the FedIT relative score
    # the gaps with their intervals, and ROUGE-L with its interval, when the record has them
    comp["summary"] = {"ordering": {}, "gaps": {"examples": 4, "resamples": 10, "level": 0.9, "fraction": None, "gaps": [
        {"name": "federated - base", "value": -1.0, "low": -1.5, "high": -0.5}]},
        "generation": {m: {"rouge_l": {"value": 0.5, "low": 0.25, "high": 0.75}, "exact_match": {"value": 0.0, "low": 0.0, "high": 0.0}}
                       for m in models}}
    html = comparison_report(tmp_path, comp).read_text()
    assert "held-out loss gaps on 4 held-out examples (90% paired bootstrap interval over examples" in html
    assert "federated - base" in html and "[0.250, 0.750]" in html and "ROUGE-L 90% interval" in html
    # no answers scored (eval.generation_examples=0): the summary shows dashes, not ROUGE-L / exact match 0.000
    comp["summary"] = {"ordering": {}}
    comp["generation"] = {m: {"rouge_l": 0.0, "exact_match": 0.0, "examples": 0, "per_category": {}} for m in models}
    html = comparison_report(tmp_path, comp).read_text()
    assert "0.000" not in html.split("summary", 1)[-1].split("</table>", 1)[0]


def test_report_of_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(CheckpointError, match="holds neither metrics.jsonl nor comparison.json"):
        write_report(tmp_path)


def test_a_run_with_federated_evaluation_reports_it(finished_run, tmp_path):
    import json

    run = shutil.copytree(finished_run, tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        for rnd, loss in ((0, 3.25), (1, 2.125)):
            line = {"type": "federated_eval", "round": rnd, **heldout(loss), "tokens": 40, "clients": [0, 2], "failed": [], "per_client": {}}
            f.write(json.dumps(line) + "\n")
        f.write(json.dumps({"type": "federated_eval", "round": 2, "examples": 0, "clients": [], "failed": [{"client": 1, "reason": "x"}]}) + "\n")

    html = write_report(run).read_text()

    section = html[html.index("<h2>federated evaluation</h2>"):]
    assert "3.2500" in section and "2.1250" in section and "round 0" in section and "round 1" in section
