"""Process settings of the entry points: the CPU allocator keeps freed memory for the next step."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SETTING = "from magnets.runtime import keep_freed_memory; print(keep_freed_memory(), keep_freed_memory())"


def keep_freed_memory_in_a_child(system_malloc: str) -> str:
    env = {**os.environ, "MAGNETS_SYSTEM_MALLOC": system_malloc}
    return subprocess.run([sys.executable, "-c", SETTING], env=env, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_glibc_takes_the_setting_and_the_opt_out_leaves_it():
    """glibc accepts both thresholds (mallopt returns 1), again when set twice; MAGNETS_SYSTEM_MALLOC=1 sets nothing."""
    assert keep_freed_memory_in_a_child("0") == "True True"
    assert keep_freed_memory_in_a_child("1") == "False False"
