"""fedtune/malloc.py: glibc settings applied by the CLI process."""

from __future__ import annotations

import platform

import pytest

from fedtune import malloc


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tune_applies_the_settings_on_glibc():
    assert malloc.tune({malloc.M_MMAP_THRESHOLD: 4 << 20, malloc.M_ARENA_MAX: 2}) is True



def test_the_users_own_malloc_environment_wins():
    """Before: MALLOC_ARENA_MAX=8 or GLIBC_TUNABLES=glibc.malloc.mmap_threshold=... were overridden by the CLI."""
    env = {"MALLOC_ARENA_MAX": "8", "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536:glibc.malloc.tcache_count=0"}
    assert malloc.ours(malloc.DEFAULTS, env) == {malloc.M_TRIM_THRESHOLD: 64 << 20}
    assert malloc.ours(malloc.DEFAULTS, {}) == malloc.DEFAULTS


def test_no_c_library_is_no_error(monkeypatch):
    monkeypatch.setattr(malloc.ctypes.util, "find_library", lambda name: "libfedtune-no-such-libc.so")
    assert malloc.tune() is False
