"""fedtune/native_memory.py: glibc and kernel-cache settings applied by the CLI process."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from fedtune import native_memory


@pytest.fixture(autouse=True)
def cache_environment(monkeypatch):
    """bound_kernel_caches() writes the cache capacities to os.environ: undo that after each test."""
    for name in native_memory.KERNEL_CACHES:
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)  # recorded as unset, restored as unset


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tune_applies_the_settings_on_glibc():
    """In a child process: malloc settings hold for the rest of a process's life."""
    code = ("from fedtune import native_memory as m; import sys; "
            "sys.exit(0 if m.tune({m.M_MMAP_THRESHOLD: 4 << 20, m.M_ARENA_MAX: 2}) is True else 3)")
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=120).returncode == 0



def test_the_users_own_malloc_environment_wins():
    """Before: MALLOC_ARENA_MAX=8 or GLIBC_TUNABLES=glibc.malloc.mmap_threshold=... were overridden by the CLI."""
    env = {"MALLOC_ARENA_MAX": "8", "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536:glibc.malloc.tcache_count=0"}
    assert native_memory.ours(native_memory.DEFAULTS, env) == {native_memory.M_TRIM_THRESHOLD: 64 << 20}
    assert native_memory.ours(native_memory.DEFAULTS, {}) == native_memory.DEFAULTS


def test_no_c_library_is_no_error(monkeypatch):
    monkeypatch.setattr(native_memory.ctypes.util, "find_library", lambda name: "libfedtune-no-such-libc.so")
    assert native_memory.tune() is False


def test_kernel_caches_are_capped_unless_the_user_set_them():
    """Before: oneDNN's and ideep's caches kept 1,024 kernels each, one per matmul shape (bf16 RSS grew every step)."""
    ours = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"}
    assert native_memory.kernel_cache_settings({}) == ours
    assert native_memory.kernel_cache_settings({"LRU_CACHE_CAPACITY": "8"}) == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}
    assert native_memory.kernel_cache_settings({"DNNL_PRIMITIVE_CACHE_CAPACITY": "0"}) == {"LRU_CACHE_CAPACITY": "64"}


def test_training_commands_set_the_cache_capacities_in_the_environment(monkeypatch):
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "5")
    native_memory.bound_kernel_caches()
    assert native_memory.os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"
    assert native_memory.os.environ["LRU_CACHE_CAPACITY"] == "5"
