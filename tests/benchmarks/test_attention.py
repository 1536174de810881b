"""benchmarks/attention.py times the same attention both ways: PyTorch's bf16 kernel as SDPA
runs it under autocast, and fedtune's packed_sdpa on the same inputs."""

import torch

from benchmarks.attention import attend, inputs
from tests.tolerance import close


def test_both_kernels_compute_the_same_attention_in_bf16():
    q, k, v = inputs(24, requires_grad=False)
    with torch.no_grad():
        ours, theirs = attend("fedtune", q, k, v), attend("bf16_kernel", q, k, v)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert ours.shape == (1, 24, 9, 64) and theirs.transpose(1, 2).shape == ours.shape
    assert close(ours.float(), theirs.transpose(1, 2).float(), 2e-2)  # the bf16 kernel's own rounding
