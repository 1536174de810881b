"""Shared benchmark plumbing: configs, subprocess runs with peak-RSS capture, result files."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


STATM = Path("/proc/self/statm")


def current_rss_mb() -> float:
    """Resident set size of this process now (Linux: /proc/self/statm, in pages)."""
    return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@contextlib.contextmanager
def training_clock() -> Iterator[dict[str, float]]:
    """Time the in-process engine's round loop less the held-out evaluations inside it: within
    the block, ``inprocess.run_rounds`` and ``Federation.evaluate`` are timed; on exit the yielded
    dict holds ``rounds_seconds``, ``eval_seconds`` and ``train_seconds`` (their difference)."""
    from fedtune.federation import inprocess

    clock = {"rounds_seconds": 0.0, "eval_seconds": 0.0, "train_seconds": 0.0}
    inside = [False]
    evaluate, run_rounds = inprocess.Federation.evaluate, inprocess.run_rounds

    def timed_evaluate(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return evaluate(self, *args, **kwargs)
        finally:
            clock["eval_seconds"] += (time.perf_counter() - t) if inside[0] else 0.0

    def timed_rounds(*args, **kwargs):
        inside[0], t = True, time.perf_counter()
        try:
            return run_rounds(*args, **kwargs)
        finally:
            inside[0] = False
            clock["rounds_seconds"] += time.perf_counter() - t

    inprocess.Federation.evaluate, inprocess.run_rounds = timed_evaluate, timed_rounds
    try:
        yield clock
    finally:
        inprocess.Federation.evaluate, inprocess.run_rounds = evaluate, run_rounds
        clock["train_seconds"] = clock["rounds_seconds"] - clock["eval_seconds"]


# the environment that caps PyTorch's, MKL's and oneDNN's CPU kernels at AVX2 on an AVX-512 CPU
# (scripts/numerics_other_isa.py does the same for the tests)
AVX2_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def run_child(module: str, args: list[str], out: Path, timeout: int = 3600, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m module args --out out`` in a fresh process (its own peak RSS) and
    return the JSON it wrote."""
    cmd = [sys.executable, "-m", module, *args, "--out", str(out)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**env(), **(extra_env or {})}, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    result["process_seconds"] = time.perf_counter() - started
    return result


def machine() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **cpu_info(),
    }


SIMD = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")


def cpu_info() -> dict[str, Any]:
    """CPU model name and flags from /proc/cpuinfo (Linux; empty elsewhere), with the SIMD
    flags that decide fp32/bf16 speed pulled out, and whether oneDNN has native bf16."""
    import torch

    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return {}
    flags = fields.get("flags", "").split()
    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        bf16 = False
    return {"cpu_model": fields.get("model name"), "cpu_simd": [f for f in SIMD if f in flags],
            "onednn_bf16": bf16, "cpu_flags": " ".join(flags)}


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


BUNDLED = "smollm2-135m-instruct"


def bench_model(quick: bool, work: Path) -> str:
    """The model a benchmark runs: a tiny random Llama written under ``work`` (--quick), else
    the bundled SmolLM2-135M-Instruct."""
    if not quick:
        return BUNDLED
    from benchmarks.throughput import tiny_model

    return str(tiny_model(work / "tiny"))
