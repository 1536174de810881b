"""PyTorch operations per training step: what bounds a small model's step on a GPU.

On a GPU a 135M-parameter model's step is bound by the host launching kernels, not by the GPU
(benchmarks/results/throughput-cuda.json: 470 ms per bf16 step on an H200, where its matmuls
need a few). The number of operations a step dispatches is what that costs, and it is the same
count on a CPU, so it is measured here, on any machine: a ``TorchDispatchMode`` counts every
ATen operation of ``LocalTrainer._step`` (forward, backward, optimizer) on the throughput
workload's rows, per precision, by name.

The optimizer part differs by device: on a CPU AdamW updates tensor by tensor (``lerp_``,
``addcdiv_``, ... once per adapter tensor, plus a ``.item()`` per tensor), on CUDA it uses its
multi-tensor (foreach) path; ``by_name`` shows which operations those are.

    python -m benchmarks.step_ops   # SmolLM2-135M, 3 steps each in bf16 and fp32 (~1 min on 2 cores)
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import tempfile
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import BUNDLED, RESULTS, machine, write_json
from benchmarks.data import write_dolly_like
from benchmarks.throughput import overrides


class CountOps(TorchDispatchMode):
    """Counts the ATen operations dispatched inside it, by name."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_steps(precision: str, work: Path, steps: int = 3) -> list[dict]:
    """Operations of the first ``steps`` training steps of one client on the throughput workload."""
    from fedtune.client.sft import LocalTrainer
    from fedtune.config import load_config
    from fedtune.federation import inprocess

    data = write_dolly_like(work / "rows.jsonl", 200)
    cfg = load_config(None, overrides(data, work / precision, BUNDLED, 200) + [
        f"train.precision={precision}", "federation.rounds=1", "federation.clients_per_round=1", f"train.local_steps={steps}",
        "partition.num_clients=4", "eval.base_cache=false", "output.report=false",
        "train.max_batch_tokens=100000",  # one micro-batch per step, as on CUDA (no token limit there)
    ])
    counted = []
    step = LocalTrainer._step

    def counting(trainer, batches, step_tokens, *a, **k):
        with CountOps() as mode:
            out = step(trainer, batches, step_tokens, *a, **k)
        counted.append({"tokens": sum(int(b["input_ids"].numel()) for b in batches), "micro_batches": len(batches),
                        "ops": sum(mode.ops.values()), "by_name": dict(mode.ops.most_common())})
        return out

    LocalTrainer._step = counting
    try:
        inprocess.run(cfg)
    finally:
        LocalTrainer._step = step
    return counted


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedtune-ops-"))
    try:
        per_precision = {precision: count_steps(precision, work) for precision in ("bf16", "fp32")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"machine": machine(), "benchmark": "aten operations per training step", "model": BUNDLED,
              "steps": per_precision,
              "median_ops": {k: sorted(s["ops"] for s in v)[len(v) // 2] for k, v in per_precision.items()}}
    write_json(args.out or RESULTS / "step_ops.json", result)
    print(json.dumps({"median_ops": result["median_ops"],
                      "tokens": {k: [s["tokens"] for s in v] for k, v in per_precision.items()}}, indent=2))


if __name__ == "__main__":
    main()
