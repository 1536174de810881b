"""task=dpo through the in-process engine, and federated SFT followed by federated DPO."""

import json
import threading

import pytest
import torch

from fedtune.config import load_config
from fedtune.errors import CheckpointError
from fedtune.federation.inprocess import run
from fedtune.model.lora import load_adapter
from tests.federation.test_inprocess import StopAfter, records
from tests.tolerance import FORWARD, adapters_close, margin_scale, numbers_close

DPO = ["task=dpo", "dpo.beta=0.5", "federation.rounds=2", "train.local_steps=2"]


@pytest.fixture
def sft_run(tiny_overrides, tmp_path):
    return run(load_config(None, tiny_overrides + ["federation.rounds=1", f"output.dir={tmp_path / 'sft'}"])).run_dir


def test_dpo_run_logs_preference_metrics_per_round(tiny_overrides):
    result = run(load_config(None, tiny_overrides + DPO))
    evals = records(result.run_dir, "eval")
    assert [e["round"] for e in evals] == [0, 1, 2]
    assert evals[0]["reward_accuracy"] == 0.5 and evals[0]["margin"] == 0.0  # the policy is its own reference
    assert evals[-1]["margin"] > 0 and evals[-1]["loss"] < evals[0]["loss"]
    assert len(evals[0]["per_category"]) == 10
    fits = records(result.run_dir, "fit")
    assert len(fits) == 4 and all({"reward_accuracy", "margin", "chosen_logp", "rejected_logp"} <= set(f) for f in fits)
    assert json.loads((result.run_dir / "partition.json").read_text())["method"] == "shards"
    assert (result.run_dir / "eval.png").is_file()  # reward accuracy, margin ... per round
    assert result.samples_after and result.samples_after[0]["reference"]  # held-out prompt with its chosen answer


def test_sft_then_dpo_resumes_like_any_run(tiny_overrides, tmp_path, sft_run):
    sft_adapter, _ = load_adapter(sft_run / "adapter")
    dpo = tiny_overrides + DPO + [f"model.init_adapter={sft_run}"]
    straight = run(load_config(None, dpo + [f"output.dir={tmp_path / 'straight'}"]))

    stop = threading.Event()
    cut = load_config(None, dpo + [f"output.dir={tmp_path / 'cut'}"])
    first = run(cut, progress=StopAfter(stop, 1), stop=stop)
    assert first.rounds_done == 1 and not first.finished
    resumed = run(cut, resume=True)

    assert resumed.finished
    fa, _ = load_adapter(straight.run_dir / "adapter")
    fb, _ = load_adapter(resumed.run_dir / "adapter")
    assert adapters_close(fa, fb)
    assert not all(torch.allclose(fa[k], sft_adapter[k]) for k in fa)  # DPO moved on from the SFT adapter
    a, b = records(straight.run_dir, "eval"), records(resumed.run_dir, "eval")
    assert [e["round"] for e in a] == [e["round"] for e in b]
    assert all(numbers_close(x["loss"], y["loss"], FORWARD) for x, y in zip(a, b))
    assert all(numbers_close(x["margin"], y["margin"], FORWARD, margin_scale(x, 0.5)) for x, y in zip(a, b))  # dpo.beta=0.5
    assert records(straight.run_dir, "eval")[0]["margin"] == 0.0  # reference=initial: the SFT adapter


def test_base_reference_measures_the_sft_adapter_against_the_base_model(tiny_overrides, tmp_path, sft_run):
    cfg = load_config(None, tiny_overrides + DPO + ["federation.rounds=1", "dpo.reference=base", f"model.init_adapter={sft_run}"])
    start = run(cfg).initial_eval
    assert start["margin"] != 0.0 and start["chosen_reward"] != 0.0


def test_init_adapter_from_an_unfinished_run_says_how_to_finish_it(tiny_overrides, tmp_path):
    stop = threading.Event()
    unfinished = run(load_config(None, tiny_overrides + [f"output.dir={tmp_path / 'sft'}"]), progress=StopAfter(stop, 1), stop=stop)
    with pytest.raises(CheckpointError, match=r"has not finished \(no adapter/ yet\); finish it with `fedtune run --resume"):
        run(load_config(None, tiny_overrides + DPO + [f"model.init_adapter={unfinished.run_dir}"]))
