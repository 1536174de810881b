import json
import shutil

import pytest

from fedtune.errors import CheckpointError
from fedtune.evaluation.evaluate import evaluate_run
from fedtune.reporting.metrics import read_metrics
from fedtune.reporting.progress import Progress


class Phases(Progress):
    def __init__(self):
        self.started, self.advanced, self.finished = [], {}, []

    def phase_started(self, name, total):
        self.started.append((name, total))

    def phase_advanced(self, name, n):
        self.advanced[name] = self.advanced.get(name, 0) + n

    def phase_finished(self, name, seconds):
        self.finished.append(name)


@pytest.fixture
def run_copy(finished_run, tmp_path):
    return shutil.copytree(finished_run, tmp_path / "run")


def test_eval_on_the_runs_heldout_set_matches_its_final_evaluation(run_copy):
    # Act
    progress = Phases()
    record = evaluate_run(run_copy, progress=progress)

    # Assert
    final = [r for r in read_metrics(run_copy / "metrics.jsonl") if r["type"] == "eval"][-1]
    holdout = json.loads((run_copy / "partition.json").read_text())["holdout"]
    assert record["heldout"]["examples"] == len(holdout) == final["examples"]
    assert record["heldout"]["loss"] == pytest.approx(final["loss"], rel=1e-5)
    assert record["generation"]["examples"] == 4 and len(record["samples"]) == 4  # eval.generation_examples=4
    assert len(record["generation"]["per_category"]) == 4  # spread over categories
    assert record["judge"] is None
    saved = json.loads((run_copy / "evaluations" / "heldout.json").read_text())
    assert saved["heldout"]["loss"] == record["heldout"]["loss"]
    assert "evaluation: heldout" in (run_copy / "report.html").read_text()
    # no silent phase: loading, tokenising, held-out batches, answers
    names = [n for n, _ in progress.started]
    assert names == ["loading model", "tokenising", "held-out loss", "generating answers"] and progress.finished == names
    totals = dict(progress.started)
    assert totals["held-out loss"] >= 1 and progress.advanced["held-out loss"] == totals["held-out loss"]
    assert totals["generating answers"] == progress.advanced["generating answers"] == 4


def test_eval_of_the_base_model_is_the_untrained_starting_point(run_copy):
    record = evaluate_run(run_copy, base=True)
    start = [r for r in read_metrics(run_copy / "metrics.jsonl") if r["type"] == "eval"][0]
    assert record["name"] == "base-heldout" and record["heldout"]["loss"] == pytest.approx(start["loss"], rel=1e-5)


def test_eval_on_another_file_with_its_own_columns(run_copy, tmp_path):
    # Arrange
    rows = [{"instruction": f"What is {i} plus 1?", "response": f"{i} plus 1 equals {i + 1}."} for i in range(5)]
    data = tmp_path / "extra.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    # Act
    record = evaluate_run(run_copy, data=str(data), overrides=["data.columns.output=response", "eval.generation_examples=2"])

    # Assert
    assert record["name"] == "extra" and record["heldout"]["examples"] == 5
    assert list(record["heldout"]["per_category"]) == ["all"] and record["generation"]["examples"] == 2
    assert (run_copy / "evaluations" / "extra.json").is_file()


def test_eval_needs_a_run_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is not a fedtune run directory"):
        evaluate_run(tmp_path)


def test_eval_of_the_base_model_is_computed_once_and_reused_by_content(run_copy, tmp_path, monkeypatch):
    # Arrange
    cache = ["eval.base_cache=true", f"eval.base_cache_dir={tmp_path / 'cache'}"]
    first = evaluate_run(run_copy, base=True, overrides=cache)

    # Act
    progress = Phases()
    again = evaluate_run(run_copy, base=True, overrides=cache, progress=progress)
    longer = evaluate_run(run_copy, base=True, overrides=cache + ["eval.max_new_tokens=5"], progress=(changed := Phases()))

    # Assert: nothing evaluated the second time, the same numbers and answers
    assert [n for n, _ in progress.started] == ["loading model", "tokenising"]
    assert again["heldout"] == first["heldout"] and again["samples"] == first["samples"]
    # other answer settings: the held-out loss is reused, the answers are not
    assert [n for n, _ in changed.started] == ["loading model", "tokenising", "generating answers"]
    assert longer["heldout"] == first["heldout"]
    evaluate_run(run_copy, base=True, overrides=cache + ["eval.generation_batch_size=1"], progress=(one := Phases()))
    assert [n for n, _ in one.started] == ["loading model", "tokenising", "generating answers"]  # batching is in the answers' key
    # another torch, transformers or peft: nothing is reused (the cache outlives installs)
    import fedtune.evaluation.base_cache as base_cache

    installed = base_cache.library_versions()
    monkeypatch.setattr(base_cache, "library_versions", lambda: {**installed, "torch": "0.0"})
    evaluate_run(run_copy, base=True, overrides=cache, progress=(upgraded := Phases()))
    assert [n for n, _ in upgraded.started] == ["loading model", "tokenising", "held-out loss", "generating answers"]
    # the run's adapter is not the base: its held-out loss is computed, then kept under its content; its answers never
    trained, again_trained = Phases(), Phases()
    adapter = evaluate_run(run_copy, overrides=cache, progress=trained)
    assert "held-out loss" in [n for n, _ in trained.started] and adapter["heldout"]["loss"] != first["heldout"]["loss"]
    assert evaluate_run(run_copy, overrides=cache, progress=again_trained)["heldout"] == adapter["heldout"]
    assert [n for n, _ in again_trained.started] == ["loading model", "tokenising", "generating answers"]
