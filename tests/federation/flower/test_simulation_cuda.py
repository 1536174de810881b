"""Flower's simulation on a GPU: Ray places ClientApps on fractions of it (``flower.client_gpus``).
Skipped without CUDA; the H200 run is recorded in benchmarks/results/cuda-tests.json."""

import pytest
import torch

from fedtune.config import load_config
from fedtune.federation.flower import simulation
from fedtune.federation.inprocess import run
from fedtune.model.lora import load_adapter
from tests.tolerance import adapters_close

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.timeout(600)
def test_flower_simulation_shares_the_gpu_between_clients(tiny_overrides, tmp_path):
    """flower.client_gpus=0.5: Ray places two ClientApps on the one GPU; the run ends with the
    in-process engine's adapter on the same GPU (float32, no dropout)."""
    common = tiny_overrides + ["model.device=cuda", "train.precision=fp32", "model.dtype=float32", "lora.dropout=0", "federation.rounds=2",
                               "flower.client_cpus=1"]  # device=cuda: an actor without its GPU share fails, not trains on the CPU
    straight = run(load_config(None, common + [f"output.dir={tmp_path / 'inprocess'}"]))
    flower = simulation.run(load_config(None, common + ["federation.engine=flower", "flower.client_gpus=0.5",
                                                      f"output.dir={tmp_path / 'flower'}"]))
    assert flower.finished and flower.rounds_done == 2
    a, _ = load_adapter(straight.run_dir / "adapter")
    b, _ = load_adapter(flower.run_dir / "adapter")
    assert adapters_close(a, b, rel=1e-2)
