"""The round loop with update validation, DP-FedAvg and simulated attackers (tiny model)."""

from pathlib import Path

import pytest
import torch

from fedtune.config import load_config
from fedtune.data.sources import Example
from fedtune.errors import AggregationError
from fedtune.federation import setup
from fedtune.federation.attacks import malicious_clients
from fedtune.federation.checkpoint import latest_checkpoint, load_checkpoint
from fedtune.federation.inprocess import run
from fedtune.model.lora import load_adapter
from fedtune.privacy import dp
from fedtune.reporting.progress import Progress
from tests.run_records import records


class Messages(Progress):
    def __init__(self):
        self.lines = []

    def message(self, text):
        self.lines.append(text)


def test_dp_run_logs_epsilon_per_round_and_stops_at_the_target(tiny_overrides):
    # 4 clients, 2 per round; the target lies between epsilon after rounds 2 and 3 -> round 3 never runs
    eps = [dp.epsilon(1.0, t, 1e-5, population=4, per_round=2, sampling="fixed") for t in (1, 2, 3)]
    target = (eps[1] + eps[2]) / 2
    dp_keys = ["privacy.dp=central", "privacy.clip_norm=0.5", "privacy.noise_multiplier=1.0", f"privacy.target_epsilon={target}"]
    progress = Messages()
    result = run(load_config(None, tiny_overrides + dp_keys), progress=progress)
    assert result.rounds_done == 2 and result.finished and (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    evals = records(result.run_dir, "eval")
    assert [e["round"] for e in evals] == [0, 1, 2]
    assert [e["epsilon"] for e in evals] == pytest.approx([0.0, eps[0], eps[1]]) and evals[-1]["delta"] == 1e-5
    assert [r["epsilon"] for r in records(result.run_dir, "round")] == pytest.approx(eps[:2])
    assert any(f"privacy.target_epsilon={target:g}" in m and "stopped after round 2" in m for m in progress.lines)
    final, _ = load_adapter(result.run_dir / "adapter")
    ckpt = load_checkpoint(latest_checkpoint(result.run_dir))
    assert ckpt.round == 2 and all(torch.equal(final[k], ckpt.adapter[k]) for k in final)

    more = dp_keys[:-1] + [f"privacy.target_epsilon={eps[2] * 1.01}"]  # a larger budget: resume spends it
    resumed = run(load_config(None, tiny_overrides + more), resume=True)
    assert resumed.rounds_done == 3 and [e["epsilon"] for e in records(result.run_dir, "eval")][-1] == pytest.approx(eps[2])


ATTACK = ["federation.rounds=1", "federation.clients_per_round=4", "attack.fraction=0.25", "attack.kind=scale",
          "attack.scale=1000", "eval.num_samples=0"]


def test_too_many_rejected_updates_fail_the_round_and_keep_the_checkpoint(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ATTACK + ["federation.min_clients=4"])
    (bad,) = malicious_clients(4, 0.25, cfg.seed)
    with pytest.raises(AggregationError, match=rf"round 1: validation rejected 1 of 4 updates \(clients \[{bad}\]; .*"
                                                r"federation.min_clients=4 remain; .*checkpoint of round 0 is intact"):
        run(cfg)
    run_dir = Path(cfg.output.dir)
    assert load_checkpoint(latest_checkpoint(run_dir)).round == 0  # the last good checkpoint, loadable (hash-verified)
    (rejected,) = records(run_dir, "rejected")
    assert rejected["client"] == bad and "above privacy.norm_bound_factor=10" in rejected["reason"]


def test_a_round_goes_on_without_rejected_updates_and_marks_attackers(tiny_overrides):
    result = run(load_config(None, tiny_overrides + ATTACK + ["federation.min_clients=3"]))
    (bad,) = malicious_clients(4, 0.25, 0)
    assert result.finished and [r["client"] for r in records(result.run_dir, "rejected")] == [bad]
    fits = {f["client"]: f for f in records(result.run_dir, "fit")}
    assert fits[bad]["malicious"] is True and not any(f.get("malicious") for c, f in fits.items() if c != bad)
    assert fits[bad]["norm"] > 100 * max(f["norm"] for c, f in fits.items() if c != bad)  # 1000 x an honest-sized delta
    assert records(result.run_dir, "round")[0]["rejected"] == [bad]


def test_data_attackers_train_on_poisoned_shards(tokenizer):
    cfg = load_config(None, ["partition.num_clients=4", "attack.fraction=0.5", "attack.kind=poison", "attack.poison_text=NOPE"])
    examples = [Example(f"question {i}", "", f"answer {i}", "c") for i in range(8)]
    encoded = setup.encode_examples(tokenizer, examples, cfg.data.template, 64)
    shards = [[0, 1], [2, 3], [4, 5], [6, 7]]
    out = setup.client_shards(cfg, tokenizer, examples, encoded, shards)
    bad = malicious_clients(4, 0.5, cfg.seed)
    assert len(bad) == 2
    for cid, shard in enumerate(shards):
        answers = [tokenizer.decode(e.input_ids[e.prompt_len:]) for e in out[cid]]
        if cid in bad:
            assert all(a.startswith("NOPE") for a in answers), answers
        else:
            assert all(e is encoded[i] for e, i in zip(out[cid], shard))  # honest shards are the shared encodings
