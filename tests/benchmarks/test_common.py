"""benchmarks/common.py: the training clock the throughput and efficiency benchmarks share."""

from __future__ import annotations

from benchmarks.common import training_clock
from fedtune.config import load_config
from fedtune.federation import inprocess


def test_training_clock_times_the_rounds_less_their_evaluations(tiny_overrides):
    # Arrange: a tiny two-round run that evaluates every round (the last one with final=True)
    cfg = load_config(None, tiny_overrides + ["federation.rounds=2", "eval.every=1"])
    evaluate, run_rounds = inprocess.Federation.evaluate, inprocess.run_rounds
    # Act
    with training_clock() as clock:
        inprocess.run(cfg)
    # Assert: both phases were timed, training is their difference, the engine is as it was
    assert clock["rounds_seconds"] > clock["eval_seconds"] > 0
    assert clock["train_seconds"] == clock["rounds_seconds"] - clock["eval_seconds"]
    assert (inprocess.Federation.evaluate, inprocess.run_rounds) == (evaluate, run_rounds)
