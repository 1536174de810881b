"""Memory settings of the native libraries (applied by the CLI, never on import): glibc's malloc
for every command, and oneDNN's and ideep's kernel caches for the commands that train.

PyTorch on CPU frees and re-allocates the same large activation buffers every micro-batch.
glibc's default raises its mmap threshold after the first large frees (up to 32 MiB), so
later buffers come from the heap, and freed heap memory above the top chunk is kept, not
returned: a process holds ~0.7 GB it no longer uses (measured on the throughput workload).
:func:`tune` fixes the mmap threshold (large buffers are mapped and unmapped, so freed
memory goes back at once) and limits the arenas (threads share one pool instead of each
keeping its own). Settings that cost speed are not applied: see benchmarks/step_memory.py.

Under bf16 on a CPU, matmuls run through oneDNN, which compiles a kernel for every matmul shape
and keeps it in its primitive cache (1,024 entries by default), and ideep keeps one more cache
of them (also 1,024). Packed micro-batches bring new token counts every step, so a bf16 run's
memory grew ~20 MB per step, for hundreds of steps (benchmarks/results/shape_memory.json).
:func:`bound_kernel_caches` caps both at ``KERNEL_CACHE_CAPACITY`` entries (enough for one step's
shapes, so a step reuses its kernels), through the environment variables oneDNN and ideep read
when they first build a kernel: the training commands (run, compare, flower worker) set them
before any matmul. A capacity the user set wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from typing import Mapping, Optional

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
DEFAULTS = {M_MMAP_THRESHOLD: 4 << 20, M_TRIM_THRESHOLD: 64 << 20, M_ARENA_MAX: 2}
# a setting the user made in the environment wins over ours (glibc reads these at start-up)
USER_SETTINGS = {M_MMAP_THRESHOLD: ("MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
                 M_TRIM_THRESHOLD: ("MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
                 M_ARENA_MAX: ("MALLOC_ARENA_MAX", "glibc.malloc.arena_max")}


def ours(settings: Mapping[int, int], environ: Optional[Mapping[str, str]] = None) -> dict[int, int]:
    """``settings`` less those the user set in the environment (``MALLOC_ARENA_MAX=...`` or
    ``GLIBC_TUNABLES=glibc.malloc.arena_max=...``)."""
    environ = os.environ if environ is None else environ
    tunables = {t.split("=", 1)[0].strip() for t in environ.get("GLIBC_TUNABLES", "").split(":")}
    return {k: v for k, v in settings.items()
            if not (k in USER_SETTINGS and (USER_SETTINGS[k][0] in environ or USER_SETTINGS[k][1] in tunables))}


KERNEL_CACHE_CAPACITY = 64
# oneDNN reads ONEDNN_ (or the older DNNL_) PRIMITIVE_CACHE_CAPACITY; ideep reads LRU_CACHE_CAPACITY
KERNEL_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": ("DNNL_PRIMITIVE_CACHE_CAPACITY",), "LRU_CACHE_CAPACITY": ()}


def kernel_cache_settings(environ: Optional[Mapping[str, str]] = None, capacity: int = KERNEL_CACHE_CAPACITY) -> dict[str, str]:
    """The cache capacities to set: each of :data:`KERNEL_CACHES` the user has not set."""
    environ = os.environ if environ is None else environ
    return {name: str(capacity) for name, aliases in KERNEL_CACHES.items() if not any(n in environ for n in (name, *aliases))}


def bound_kernel_caches() -> None:
    """Cap the kernel caches (:func:`kernel_cache_settings`) for this process and its children:
    called by the commands that train, before any matmul."""
    os.environ.update(kernel_cache_settings())


def tune(settings: dict[int, int] = DEFAULTS) -> bool:
    """Apply ``mallopt`` ``settings`` to this process, except those the user set in the
    environment (:func:`ours`); False where the C library is not glibc."""
    settings = ours(settings)
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = all([mallopt(ctypes.c_int(k), ctypes.c_int(v)) == 1 for k, v in settings.items()])  # each applied, even after a refusal
    if not ok:
        log.debug("mallopt refused some of %s", settings)
    return ok
