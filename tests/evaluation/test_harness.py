"""`fedtune bench` and eval.harness_tasks: lm-evaluation-harness on a run's adapter and its base
model, offline, over local YAML tasks built here."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from fedtune.errors import ConfigError, DataError
from fedtune.evaluation import harness
from fedtune.federation.rundir import EVALUATIONS, FINAL_ADAPTER, HARNESS_FILE, HARNESS_TABLE

QA = """task: tiny_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
TEXT = """task: tiny_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""


@pytest.fixture
def tasks_dir(tmp_path) -> Path:
    """Two local lm-eval tasks over JSONL files: multiple choice (acc) and rolling log-likelihood (perplexity)."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    qa = [{"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(2 * i + 1), "blue"], "label": 0} for i in range(6)]
    text = [{"text": f"Give three tips for staying healthy. Number {i}: eat well, sleep, and walk."} for i in range(4)]
    (folder / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    (folder / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text))
    (folder / "tiny_qa.yaml").write_text(QA.format(data=folder / "qa.jsonl"))
    (folder / "tiny_text.yaml").write_text(TEXT.format(data=folder / "text.jsonl"))
    return folder


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def test_metric_names_rows_and_table():
    values, errors = harness.flatten_results({"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1,
                                                    "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A"}})
    assert values == {"t": {"acc": 0.5, "exact_match/strict-match": 0.25}} and errors == {"t": {"acc": 0.1}}
    rows = harness.side_by_side({"t": {"acc": 0.75}}, {"t": {"acc": 0.5}})
    assert rows == [{"task": "t", "metric": "acc", "base": 0.5, "adapter": 0.75, "delta": 0.25}]
    assert harness.side_by_side({"t": {"acc": 0.75}}, None)[0]["delta"] is None
    assert harness.markdown_table(rows).splitlines()[2] == "| t | acc | 0.5000 | 0.7500 | +0.2500 |"


def test_bench_puts_the_adapter_beside_the_base_model(run_copy, tasks_dir):
    # Act
    from fedtune.reporting.progress import Progress

    class Phases(Progress):
        def __init__(self):
            self.started = []

        def phase_started(self, name, total):
            self.started.append(name)

    progress = Phases()
    record = harness.bench_run(run_copy, ["tiny_qa", "tiny_text"], include_path=tasks_dir, limit=4, batch_size=4, progress=progress)
    # Assert
    assert progress.started == ["harness tasks", "harness tasks"]  # base, then adapter: each evaluation shows progress
    rows = {(r["task"], r["metric"]): r for r in record["rows"]}
    assert set(rows) == {("tiny_qa", "acc"), ("tiny_text", "word_perplexity"), ("tiny_text", "bits_per_byte")}
    ppl = rows[("tiny_text", "word_perplexity")]
    assert ppl["base"] != ppl["adapter"] and ppl["delta"] == ppl["adapter"] - ppl["base"]  # the adapter was on, then off
    assert record["samples"]["tiny_qa"] == {"original": 6, "effective": 4}
    saved = json.loads((run_copy / EVALUATIONS / HARNESS_FILE).read_text())
    assert saved["rows"] == record["rows"]
    assert "| tiny_text | word_perplexity |" in (run_copy / EVALUATIONS / HARNESS_TABLE).read_text()
    from fedtune.reporting.report import write_report  # the report shows the table beside fedtune eval's

    assert "standard benchmarks (lm-evaluation-harness)" in write_report(run_copy).read_text()


def test_the_adapter_column_is_what_lm_eval_measures_for_base_plus_peft_folder(run_copy, tasks_dir, tiny_model_dir):
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    record = harness.bench_run(run_copy, ["tiny_text"], include_path=tasks_dir, base=False)
    lm = HFLM(pretrained=str(tiny_model_dir), peft=str(run_copy / FINAL_ADAPTER), device="cpu", dtype="float32", batch_size=4)
    out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_text"], task_manager=harness.load_tasks(["tiny_text"], tasks_dir)[0], log_samples=False)
    theirs = out["results"]["tiny_text"]["bits_per_byte,none"]
    ours = next(r for r in record["rows"] if r["metric"] == "bits_per_byte")
    assert ours["base"] is None and ours["adapter"] == pytest.approx(theirs, rel=1e-5)


def test_unknown_tasks_and_a_missing_lm_eval_are_one_line_errors(run_copy, tasks_dir, monkeypatch):
    with pytest.raises(ConfigError, match=r"harness tasks: unknown tiny_q \(did you mean tiny_qa\?\)"):
        harness.bench_run(run_copy, ["tiny_q"], include_path=tasks_dir)
    with pytest.raises(ConfigError, match="not a folder"):
        harness.bench_run(run_copy, ["tiny_qa"], include_path=tasks_dir / "nope")
    hub = (tasks_dir / "tiny_qa.yaml").read_text().replace("task: tiny_qa", "task: hub_qa").replace("dataset_path: json", "dataset_path: someone/qa")
    (tasks_dir / "hub_qa.yaml").write_text(hub.split("dataset_kwargs")[0] + "test_split: test" + hub.split("test_split: test")[1])
    with pytest.raises(DataError, match=r"harness tasks hub_qa: a dataset could not be fetched \(.*\); connect to the Hugging Face hub"):
        harness.bench_run(run_copy, ["hub_qa"], include_path=tasks_dir)  # offline (conftest): the hub is out of reach
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(ConfigError) as err:
        harness.bench_run(run_copy, ["tiny_qa"], include_path=tasks_dir)
    assert str(err.value) == "standard benchmarks need lm-evaluation-harness, which is not installed; pip install 'fedtune[harness]'"


def test_bench_command_prints_the_table_and_a_missing_lm_eval_exits_2(run_copy, tasks_dir, monkeypatch):
    from typer.testing import CliRunner

    from fedtune import cli
    from tests.test_cli import fedtune

    proc = fedtune("bench", run_copy, "--tasks", "tiny_qa", "--include-path", tasks_dir, "--limit", "2", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    assert "tiny_qa" in proc.stdout and "delta" in proc.stdout and f"{EVALUATIONS}/{HARNESS_FILE}" in proc.stdout.replace("\n", "")
    assert "bench: base on tiny_qa (limit 2)" in proc.stderr and "Traceback" not in proc.stderr
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    result = CliRunner().invoke(cli.app, ["bench", str(run_copy), "--tasks", "tiny_qa"])
    assert result.exit_code == 2
    assert "pip install 'fedtune[harness]'" in result.output


def test_compare_adds_the_harness_tasks_as_columns(tiny_overrides, tasks_dir):
    from fedtune.config import load_config
    from fedtune.evaluation.compare import compare

    cfg = load_config(None, tiny_overrides + [
        "federation.rounds=1", "compare.models=[base, federated]", "eval.generation_examples=2",
        "eval.harness_tasks=[tiny_qa, tiny_text]", "eval.harness_limit=2", f"eval.harness_include_path={tasks_dir}",
    ])
    comparison = compare(cfg).comparison
    bench = comparison["harness"]
    assert set(bench) == {"base", "federated"}
    assert set(bench["base"]) == {"tiny_qa", "tiny_text"} and set(bench["federated"]["tiny_qa"]) == {"acc"}
    assert bench["base"]["tiny_text"]["word_perplexity"] != bench["federated"]["tiny_text"]["word_perplexity"]


def test_compare_checks_the_harness_tasks_before_training(tiny_overrides, tasks_dir, monkeypatch):
    from fedtune.config import load_config
    from fedtune.evaluation.compare import compare

    cfg = load_config(None, tiny_overrides + ["compare.models=[base, federated]", "eval.harness_tasks=[tiny_qa]",
                                              f"eval.harness_include_path={tasks_dir}"])
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'fedtune\[harness\]'"):
        compare(cfg)
    assert not (Path(cfg.output.dir) / "federated").exists()
