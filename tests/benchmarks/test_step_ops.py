"""benchmarks/step_ops.py: the operation counter."""

import torch

from benchmarks.step_ops import CountOps


def test_count_ops_counts_each_dispatched_operation_by_name():
    a, b = torch.ones(3, requires_grad=True), torch.full((3,), 2.0)
    with CountOps() as mode:
        (a * b + b).sum().backward()
    assert mode.ops["mul"] >= 2  # forward a * b, backward grad * b
    assert mode.ops["add"] == 1 and mode.ops["sum"] == 1
