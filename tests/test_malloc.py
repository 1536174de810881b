"""fedtune/malloc.py: glibc settings applied by the CLI process."""

from __future__ import annotations

import platform

import pytest

from fedtune import malloc


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tune_applies_the_settings_on_glibc():
    assert malloc.tune({malloc.M_MMAP_THRESHOLD: 4 << 20, malloc.M_ARENA_MAX: 2}) is True

