"""One decoder layer's attention on a CPU under bf16 autocast: PyTorch's bf16 flash-attention
(what SDPA runs under autocast) against fedtune's (model/attention.py: float32 with the output
cast back up to ``FLOAT32_UP_TO`` keys, the bf16 kernel at a multiple of 16 tokens beyond).

Per example length, the median time of forward + backward of one layer's causal attention at
SmolLM2-135M's shapes (9 query heads, 3 key/value heads, head dim 64): queries and keys in
float32 and values in bf16, as a bf16-autocast forward hands them over (the rotary tables
promote q and k). "bf16_kernel" is SDPA under autocast, which rounds q and k to bf16 and runs
the bf16 kernel; "fedtune" is ``packed_sdpa`` on a one-example packed row, casts included.
The lengths above ``FLOAT32_UP_TO`` show why fedtune keeps the bf16 kernel there.

Then the resident memory of a process running forward + backward at 600 random lengths
(20-700 tokens), every 100 lengths, for each in its own process: the bf16 kernel builds and
keeps kernels for every length it meets (fedtune's: only for its multiples of 16 above
``FLOAT32_UP_TO``).

    python -m benchmarks.attention          # writes benchmarks/results/attention.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS, current_rss_mb, machine, write_json

HEADS, KV_HEADS, DIM = 9, 3, 64
LENGTHS = (32, 64, 96, 128, 160, 192, 256, 384, 512, 768, 1024)


def inputs(t: int, requires_grad: bool = True):
    """(q, k, v) of one example of ``t`` tokens laid out as transformers passes them."""
    make = lambda heads, dtype: torch.randn(1, t, heads, DIM).to(dtype).transpose(1, 2).requires_grad_(requires_grad)  # noqa: E731
    return make(HEADS, torch.float32), make(KV_HEADS, torch.float32), make(KV_HEADS, torch.bfloat16)


def attend(kernel: str, q, k, v) -> torch.Tensor:
    from fedtune.model.attention import SEGMENTS, packed_sdpa

    with torch.autocast("cpu", dtype=torch.bfloat16):
        if kernel == "bf16_kernel":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return packed_sdpa(None, q, k, v, None, **{SEGMENTS: torch.tensor([q.shape[2]])})[0]


def milliseconds(kernel: str, t: int, repeats: int) -> float:
    """Median forward + backward time of one layer's attention at ``t`` tokens."""
    q, k, v = inputs(t)
    times = []
    for i in range(repeats + 3):
        start = time.perf_counter()
        attend(kernel, q, k, v).float().sum().backward()
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def memory_trace(kernel: str, lengths: int = 600, every: int = 100) -> list[float]:
    """Resident MB after every ``every`` of ``lengths`` random example lengths."""
    rng, trace = random.Random(0), [current_rss_mb()]
    for i in range(1, lengths + 1):
        attend(kernel, *inputs(rng.randint(20, 700))).float().sum().backward()
        if i % every == 0:
            trace.append(current_rss_mb())
    return trace


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out")
    p.add_argument("--memory-child", choices=("bf16_kernel", "fedtune"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        print(json.dumps(memory_trace(args.memory_child)))
        return
    kernels = ("bf16_kernel", "fedtune")
    times = {kernel: [] for kernel in kernels}
    for t in LENGTHS:
        for kernel in kernels:
            times[kernel].append(round(milliseconds(kernel, t, args.repeats), 3))
        print(f"{t} tokens: " + ", ".join(f"{kernel} {times[kernel][-1]:.2f} ms" for kernel in kernels), flush=True)
    memory = {}
    for kernel in kernels:  # a process each: the bf16 kernel's cache would stay in this one
        child = subprocess.run([sys.executable, "-m", "benchmarks.attention", "--memory-child", kernel],
                               capture_output=True, text=True, check=True)
        memory[kernel] = [round(mb, 1) for mb in json.loads(child.stdout.strip().splitlines()[-1])]
        print(f"{kernel}: resident MB every 100 lengths {memory[kernel]}", flush=True)
    result = {
        "machine": machine(), "benchmark": "attention under CPU bf16 autocast, one SmolLM2-135M layer",
        "how": __doc__.split("\n\n")[1].replace("\n", " "),
        "tokens": list(LENGTHS), "forward_backward_ms": times,
        "speedup": [round(a / b, 2) for a, b in zip(times["bf16_kernel"], times["fedtune"])],
        "resident_mb_every_100_random_lengths": memory,
    }
    write_json(args.out or RESULTS / "attention.json", result)


if __name__ == "__main__":
    main()
