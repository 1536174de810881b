"""Rerun the ``numerics`` tests (float comparisons across summation orders, see
tests/tolerance.py) under CPU kernels other than this machine's best.

Machines differ: an AVX-512 (or AVX512-BF16/AMX) CPU and an AVX2-only one sum in different
orders, so a tolerance tuned on one can fail on the other. PyTorch, MKL and oneDNN each pick
their kernels at run time and each can be capped by an environment variable; this script caps
all three one level below what the CPU has (AVX-512 -> AVX2, AVX2 -> no vectorisation) and
runs ``pytest -m numerics``, so `make test` on any x86 CPU checks two kernel sets.

Usage: python scripts/numerics_other_isa.py [pytest args...]
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

LOWER = {  # this CPU's ATen capability -> (ATen, MKL, oneDNN) caps one level below
    "AVX512": ("avx2", "AVX2", "AVX2"),
    "AVX2": ("default", "SSE4_2", "SSE41"),
}


def main(argv: list[str]) -> int:
    have = torch.backends.cpu.get_cpu_capability()
    if have not in LOWER:
        print(f"numerics: CPU capability {have}: no lower kernel set to compare against; skipped")
        return 0
    aten, mkl, onednn = LOWER[have]
    env = {**os.environ, "ATEN_CPU_CAPABILITY": aten, "MKL_ENABLE_INSTRUCTIONS": mkl, "ONEDNN_MAX_CPU_ISA": onednn}
    print(f"numerics: rerunning the float-comparison tests with {have} capped to {aten} (MKL {mkl}, oneDNN {onednn})", flush=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "numerics", *argv]
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
