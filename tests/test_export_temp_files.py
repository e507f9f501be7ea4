"""A killed export's temp files: they hold a partition's rows, so the next export removes them.

Before the sweep, a ``.part-0.parquet.{hex}.tmp`` left by a SIGKILLed export stayed in its
partition folder for good, callers' numbers and all, and outlived an ``erase`` of them.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recarchive.export.parquet import export_changed
from recarchive.store.archive import ArchiveStore
from recarchive.store.engine import create_engine_for, upgrade_database
from recarchive.tempfiles import EXPORT_SUFFIX, temp_prefix
from tests.test_parquet import JULY, normalized

# The child exports for real and SIGKILLs itself the moment the first partition's recordings
# temp file is whole: the worst moment, after the rows are on disk and before the file is put
# in place (the parties temp file, written side by side, is there too).
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from recarchive.export import parquet
    from recarchive.store.engine import create_engine_for

    real = parquet.PartitionFile.close

    def close_then_die(self):
        real(self)
        os.kill(os.getpid(), signal.SIGKILL)

    parquet.PartitionFile.close = close_then_die
    parquet.export_changed(create_engine_for(sys.argv[1]), sys.argv[2])
    """
)


def _temp_files(root: Path) -> list[Path]:
    return sorted(root.rglob(f"*{EXPORT_SUFFIX}")) + sorted(root.rglob(".part-0.parquet.*.tmp"))


def test_the_export_after_a_killed_one_removes_its_temp_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = create_engine_for(url)
    upgrade_database(engine)
    ArchiveStore(engine).save_metadata([normalized(i, created=JULY) for i in range(5)])
    root = tmp_path / "parquet"

    child = subprocess.run(
        [sys.executable, "-c", CHILD, url, str(root)], capture_output=True, timeout=120
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode(errors="replace")
    left = _temp_files(root)
    assert len(left) == 2, left  # the recordings file, and its parties file being written
    (whole,) = [path for path in left if path.parent.parent.name == "recordings"]
    assert pq.read_table(whole).num_rows == 5  # the rows are in it: this is what must go
    # A live process's temp file (this test's own pid) must survive the sweep: the control.
    live = whole.with_name(f".{temp_prefix()}0{EXPORT_SUFFIX}")
    live.write_bytes(b"in progress")

    with caplog.at_level(logging.WARNING, logger="recarchive"):
        report = export_changed(engine, str(root))
    engine.dispose()

    assert report.rows == 5
    assert _temp_files(root) == [live]
    assert "temp file(s) of killed runs" in caplog.text
    assert pq.read_table(root / "recordings").num_rows == 5  # only the part file is read


def test_temp_files_of_the_naming_before_owners_are_removed_too(tmp_path: Path) -> None:
    engine = create_engine_for(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade_database(engine)
    ArchiveStore(engine).save_metadata([normalized(1, created=JULY)])
    root = tmp_path / "parquet"
    folder = root / "recordings" / "created_month=2025-07"
    folder.mkdir(parents=True)
    legacy = folder / f".part-0.parquet.{'ab' * 16}.tmp"
    legacy.write_bytes(b"rows of an old version's killed export")
    unrelated = folder / "notes.tmp"  # not ours: never touched
    unrelated.write_bytes(b"a user's file")

    export_changed(engine, str(root))
    engine.dispose()

    assert not legacy.exists()
    assert unrelated.exists()
