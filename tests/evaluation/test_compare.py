import json
import threading

import pytest

from fedtune.config import load_config
from fedtune.errors import ConfigError
from fedtune.evaluation.compare import compare, ordering
from fedtune.reporting.progress import Progress
from fedtune.serving import ChatServer, load_chat_model
from tests.run_records import records


class Messages(Progress):
    def __init__(self):
        self.lines, self.phases, self.advanced = [], [], {}

    def message(self, text):
        self.lines.append(text)

    def phase_started(self, name, total):
        self.phases.append((name, total))

    def phase_advanced(self, name, n):
        self.advanced[name] = self.advanced.get(name, 0) + n


@pytest.fixture(scope="module")
def judge_server(finished_run):
    """One model judging another: the tiny finished run, served over HTTP."""
    srv = ChatServer(load_chat_model(finished_run, name="judge"), "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_compare_trains_evaluates_judges_and_reuses(tiny_overrides, tmp_path, judge_server):
    # Arrange
    overrides = tiny_overrides + [
        "federation.rounds=2", "local.clients=[1]", "eval.generation_examples=4",
        f"eval.judge.base_url={judge_server.url}", "eval.judge.model=judge", "eval.judge.max_tokens=4",
        "eval.judge.examples=2", "eval.judge.requests_per_second=1000", f"eval.judge.cache_dir={tmp_path / 'judge'}",
        f"output.dir={tmp_path / 'cmp'}",
    ]
    cfg = load_config(None, overrides)

    # Act
    first = Messages()
    result = compare(cfg, progress=first)

    # Assert: the runs, on one partition
    root, comp = result.folder, result.comparison
    assert comp["models"] == ["base", "local-1", "federated", "centralized"]
    partitions = {n: json.loads((root / n / "partition.json").read_text()) for n in comp["models"][1:]}
    assert all(p == partitions["federated"] for p in partitions.values())
    assert json.loads((root / "comparison.json").read_text()) == json.loads(json.dumps(comp))
    # the local-only run trained client 1, alone, every round
    assert [r["clients"] for r in records(root / "local-1", "round")] == [[1], [1]]
    # centralized used the federated budget
    assert comp["budget"]["centralized"]["optimizer_steps"] == comp["budget"]["federated"]["optimizer_steps"] == 2 * 2 * 3
    assert comp["budget"]["local-1"]["optimizer_steps"] == 2 * 3 and comp["budget"]["base"]["optimizer_steps"] == 0
    # every model evaluated on the same held-out rows; the federated number is its run's final evaluation
    held = comp["heldout"]
    assert len({h["examples"] for h in held.values()}) == 1 and held["base"]["examples"] == 30
    assert held["federated"]["loss"] == records(root / "federated", "eval")[-1]["loss"]  # read back, not recomputed
    assert held["base"]["loss"] == pytest.approx(records(root / "federated", "eval")[0]["loss"], rel=1e-5)
    # the base model was evaluated once: the first run's round 0; the other runs' round 0 and the base column reuse it
    cached = [m for m in first.lines if m.startswith("base model held-out evaluation from the evaluation cache")]
    assert len(cached) == 3 and [n for n, _ in first.phases].count("evaluation") == 3 + 2 + 2
    # each run's final evaluation is stored with its adapter's content: the compare reads all three back
    finals = [m for m in first.lines if m.startswith("this adapter held-out evaluation from the evaluation cache")]
    assert len(finals) == 3 and "held-out loss" not in [n for n, _ in first.phases]
    assert records(root / "centralized", "eval")[0] == records(root / "local-1", "eval")[0]
    round0 = records(root / "federated", "eval")[0]
    assert held["base"]["loss"] == round0["loss"] and held["base"]["per_category"] == round0["per_category"]  # the same numbers
    assert all(g["examples"] == 4 for g in comp["generation"].values())
    assert all(len(s["answers"]) == 4 for s in comp["samples"]) and len(comp["samples"]) == 4
    assert set(comp["summary"]["ordering"]) == {"centralized <= federated", "federated < local (median)", "local (median) < base"}
    # the gaps, with paired bootstrap intervals over the 30 held-out examples (per-example losses stay out of the file)
    gaps = comp["summary"]["gaps"]
    assert gaps["examples"] == 30 and gaps["resamples"] == 1000 and gaps["level"] == 0.95
    assert [g["name"] for g in gaps["gaps"]] == ["federated - local-1", "federated - centralized", "federated - base"]
    for g in gaps["gaps"]:
        other = held[g["name"].split(" - ")[1]]["loss"]
        assert g["value"] == pytest.approx(held["federated"]["loss"] - other, rel=1e-6, abs=1e-9) and g["low"] <= g["high"]
    assert gaps["fraction"]["median_local"] == pytest.approx(held["local-1"]["loss"], rel=1e-9)
    assert all("per_example" not in h for h in held.values())
    rouge = comp["summary"]["generation"]["federated"]["rouge_l"]
    assert rouge["value"] == pytest.approx(comp["generation"]["federated"]["rouge_l"]) and rouge["low"] <= rouge["value"] <= rouge["high"]
    # the judge graded every model against the references (2 questions each)
    assert set(comp["judge"]) == set(comp["models"])
    assert all(len(j["single"]["ratings"]) == 2 and len(j["pairwise"]["outcomes"]) == 2 for j in comp["judge"].values())
    # the report and its pictures
    html = (root / "report.html").read_text()
    for png in ("loss_per_round.png", "loss_per_category.png", "participation.png", "partition.png", "rouge_per_category.png"):
        assert f'src="{png}"' in html and (root / png).stat().st_size > 1000

    # Act again: everything is reused, the judge answers from its cache
    served = judge_server.count
    progress = Messages()
    again = compare(cfg, progress=progress)

    # Assert
    assert [m for m in progress.lines if " reused " in m] == [
        f"compare: {n} reused ({root / n})" for n in ("local-1", "federated", "centralized")
    ]
    assert again.comparison["heldout"] == comp["heldout"] and judge_server.count == served
    # evaluation shows progress: load, tokenise, the trained models' answers (together), then the judge calls
    names = [n for n, _ in progress.phases]  # held-out losses (the runs' final ones) and base answers come from the cache
    assert names == ["loading model", "tokenising", "generating answers", "judge calls"]
    assert "compare: answered with local-1, federated, centralized together" in progress.lines
    assert sum("from the evaluation cache" in m for m in progress.lines) == 2 + 3
    judge_calls = 2 * (1 + 4 * (1 + 2))  # 2 questions: reference ratings; per model, a rating and two pairwise verdicts
    assert progress.phases[-1] == ("judge calls", judge_calls) and progress.advanced["judge calls"] == judge_calls
    assert progress.advanced["generating answers"] == 3 * 4

    # a changed training setting is not silently reused
    with pytest.raises(ConfigError, match=r"local-1 holds a run with a different config \(lora.r \(run: 8, now: 4\)\)"):
        compare(load_config(None, overrides + ["lora.r=4"]))


def test_unknown_judge_reference_fails_before_training(tiny_overrides, tmp_path):
    cfg = load_config(None, tiny_overrides + ["eval.judge.base_url=http://127.0.0.1:9/v1", "eval.judge.reference=gpt"])
    with pytest.raises(ConfigError, match="eval.judge.reference: 'gpt' is neither 'data' nor a compared model"):
        compare(cfg)
    assert not (tmp_path / "run").exists()


def test_ordering_checks_the_fedit_relations():
    loss = {"base": 3.0, "local-1": 2.0, "local-2": 2.6, "local-3": 2.2, "federated": 1.5, "centralized": 1.5}
    # median local = 2.2
    assert ordering(loss) == {"centralized <= federated": True, "federated < local (median)": True, "local (median) < base": True}
    loss.update(federated=2.5)
    assert ordering(loss)["federated < local (median)"] is False
    assert ordering({"base": 1.0, "federated": 0.5}) == {}


def test_compare_on_flower_runs_the_federation_and_local_runs_there_and_says_centralized_did_not(tiny_overrides, tmp_path):
    cfg = load_config(None, tiny_overrides + [
        "federation.engine=flower", "flower.client_cpus=1", "federation.rounds=1", "local.clients=[1]",
        "compare.models=[local, federated, centralized]", "eval.generation_examples=2", f"output.dir={tmp_path / 'cmp'}",
    ])

    comp = compare(cfg).comparison

    assert comp["engines"] == {"local-1": "flower", "federated": "flower", "centralized": "inprocess"}
    assert records(tmp_path / "cmp" / "federated", "nodes") and records(tmp_path / "cmp" / "local-1", "nodes")  # Flower's
    assert not records(tmp_path / "cmp" / "centralized", "nodes")
    assert "centralized ran in-process" in comp["budget_note"]


def test_budget_note_names_only_what_was_compared():
    """compare.models=[base] printed 'optimizer steps (batch 4 x 1): . base: ...'; [federated] described a base not compared."""
    from fedtune.config import load_config
    from fedtune.evaluation.compare import budget_note

    zero = {"optimizer_steps": 0, "tokens": 0, "fits": 0}
    only_base = budget_note(load_config(None, ["compare.models=[base]"]), {"base": zero})
    assert "optimizer steps" not in only_base and "): ." not in only_base and only_base.startswith("base: the base model")
    fed = budget_note(load_config(None, ["compare.models=[federated]"]), {"federated": {**zero, "optimizer_steps": 4}, "base": zero})
    assert fed.startswith("optimizer steps (batch ") and "federated 4." in fed and "base:" not in fed
