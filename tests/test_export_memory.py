"""The doors choose the C library's allocator for Arrow before pyarrow loads (export/memory.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from recarchive.export.memory import POOL_VARIABLE

PROBE = "import pyarrow as pa; print(pa.default_memory_pool().backend_name)"


def backend(first_import: str, pool: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != POOL_VARIABLE}
    if pool is not None:
        env[POOL_VARIABLE] = pool
    code = f"import {first_import}; {PROBE}" if first_import else PROBE
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@pytest.mark.parametrize("door", ["recarchive.cli.app", "flows.backfill"])
def test_a_door_makes_the_system_allocator_arrow_s_pool(door: str) -> None:
    assert backend(door, None) == "system"


def test_without_a_door_pyarrow_keeps_its_own_default() -> None:
    # The control: the wheels' default is another pool, so the test above could fail.
    assert backend("", None) != "system"


def test_a_pool_the_user_chose_is_kept() -> None:
    assert backend("recarchive.cli.app", "jemalloc") == "jemalloc"


def test_an_empty_setting_counts_as_unset() -> None:
    assert backend("recarchive.cli.app", "") == "system"
