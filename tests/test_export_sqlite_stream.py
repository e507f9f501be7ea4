"""The export's child reader on SQLite (recarchive.export.sqlite_stream): same files, or none.

The child reads a partition through ADBC's SQLite driver in a process of its own. What it
gives must be what the database driver's path gives, byte for byte; and whatever goes wrong in
it (a stream cut short, rows missing or out of order, no sentinel, a crash) must end in the
driver's path for that partition, never in a file with the wrong rows.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from sqlalchemy import Engine, update

from recarchive.export import rows as export_rows
from recarchive.export import sqlite_stream
from recarchive.export.parquet import export_changed
from recarchive.store.archive import ArchiveStore
from recarchive.store.tables import recording_parties, recordings
from tests.test_parquet import AUGUST, JULY, normalized

FALLBACK = "reading it through the database driver instead"


@pytest.fixture(autouse=True)
def child_for_every_partition(monkeypatch: pytest.MonkeyPatch) -> None:
    """The child reads partitions of any size here (by default only from 20,000 recordings)."""
    monkeypatch.setattr(export_rows, "CHILD_READER_ROWS", 0)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every child stream started (by its URI), so a test knows the child path ran."""
    started: list[str] = []
    real = sqlite_stream.stream

    def spy(uri: str, *args: Any, **kwargs: Any) -> Iterator[pa.RecordBatch]:
        started.append(uri)
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(sqlite_stream, "stream", spy)
    return started


def files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*.parquet")}


def driver_files(engine: Engine, root: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    with monkeypatch.context() as patch:
        patch.setattr(sqlite_stream, "available", lambda: False)
        export_changed(engine, str(root), full=True)
    return files(root)


def fill(engine: Engine, count: int = 12) -> None:
    ArchiveStore(engine).save_metadata(
        [
            normalized(i, created=(JULY if i % 2 else AUGUST) + timedelta(seconds=i))
            for i in range(count)
        ]
    )


HOSTILE = [
    pytest.param({"conference_id": "Zoë ☎ 🎧 中文"}, id="unicode"),
    pytest.param({"conference_id": "a\x00b"}, id="nul-inside"),
    pytest.param({"conference_id": ""}, id="empty-string"),
    pytest.param({"conference_id": "x" * 200_000}, id="200k-string"),
    pytest.param({"conference_id": 'it\'s "quoted"; --'}, id="quotes"),
    pytest.param({"duration": 1e308, "stereo": False}, id="huge-real"),
    pytest.param({"duration": -0.0, "transcription": True}, id="negative-zero"),
]


@pytest.mark.parametrize("values", HOSTILE)
def test_child_and_driver_write_the_same_bytes(
    sqlite_engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    calls: list[str],
    caplog: pytest.LogCaptureFixture,
    values: dict[str, Any],
) -> None:
    """Late values after NULL-only batches (3 rows a batch here), of every column type."""
    monkeypatch.setattr(export_rows, "FETCH_ROWS", 3)
    fill(sqlite_engine)
    with sqlite_engine.begin() as connection:
        last = connection.execute(
            recordings.select().order_by(recordings.c.id.desc()).limit(2)
        ).all()
        ids = [row.id for row in last]
        connection.execute(update(recordings).where(recordings.c.id.in_(ids)).values(values))
        connection.execute(
            update(recording_parties)
            .where(recording_parties.c.recording_id.in_(ids))
            .values(number_caller_id_name=str(values.get("conference_id", "")))
        )
    with caplog.at_level(logging.WARNING, logger="recarchive"):
        export_changed(sqlite_engine, str(tmp_path / "child"), full=True)
    assert calls, "the child path did not run"
    assert FALLBACK not in caplog.text
    child = files(tmp_path / "child")
    assert len(child) == 4
    assert child == driver_files(sqlite_engine, tmp_path / "driver", monkeypatch)


def test_small_partitions_are_read_without_a_child(
    sqlite_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: list[str]
) -> None:
    monkeypatch.setattr(export_rows, "CHILD_READER_ROWS", 7)  # July has 6, August 6
    fill(sqlite_engine)
    export_changed(sqlite_engine, str(tmp_path / "a"))
    assert calls == []
    fill(sqlite_engine, 14)  # now 7 each
    export_changed(sqlite_engine, str(tmp_path / "b"))
    assert len(calls) == 2


def test_a_child_that_does_not_check_out_falls_back_to_the_driver(
    sqlite_engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    calls: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    fill(sqlite_engine)
    expected = driver_files(sqlite_engine, tmp_path / "driver", monkeypatch)
    # The parent now looks for another sentinel than the child's: every stream fails its check.
    monkeypatch.setattr(sqlite_stream, "_SENTINEL_ID", "not the sentinel")
    with caplog.at_level(logging.WARNING, logger="recarchive"):
        report = export_changed(sqlite_engine, str(tmp_path / "child"), full=True)
    assert report.rows == 12 and len(calls) == 2
    assert caplog.text.count(FALLBACK) == 2
    assert "did not start with its sentinel" in caplog.text
    assert files(tmp_path / "child") == expected


# --- the parent's checks, on streams made here ------------------------------------------------


def _stream(batches: list[list[str]], count: int | None, *, cut: bool = False) -> io.BytesIO:
    schema = pa.schema([pa.field("id", pa.string())])
    if count is not None:
        schema = schema.with_metadata({b"recarchive.rows": str(count).encode()})
    sink = io.BytesIO()
    writer = pa.ipc.new_stream(sink, schema)
    for ids in batches:
        writer.write_batch(pa.record_batch([pa.array(ids, pa.string())], schema=schema))
    if not cut:
        writer.close()
    data = sink.getvalue()
    return io.BytesIO(data[: len(data) - 40] if cut else data)


@pytest.mark.parametrize(
    ("batches", "count", "cut", "message"),
    [
        pytest.param([["a", "b"]], 2, False, "sentinel", id="no-sentinel"),
        pytest.param([], 0, False, "0 rows where SQL counted 0", id="empty-stream"),
        pytest.param([["", "a"], ["b"]], 3, False, "2 rows where SQL counted 3", id="rows-missing"),
        pytest.param([["", "a"], ["b"]], 1, False, "2 rows where SQL counted 1", id="rows-extra"),
        pytest.param([["", "a", "b"]], None, False, "counted -1", id="no-count"),
        pytest.param([["", "b", "a"]], 2, False, "not in ID order", id="unordered-in-batch"),
        pytest.param([["", "b"], ["a"]], 2, False, "not in ID order", id="unordered-across"),
        pytest.param([["", "a"], ["a"]], 2, False, "not in ID order", id="duplicate-id"),
        pytest.param([["", "a"], ["b", "c"]], 3, True, None, id="cut-short"),
    ],
)
def test_the_parent_refuses_a_stream_that_does_not_check_out(
    batches: list[list[str]], count: int | None, cut: bool, message: str | None
) -> None:
    with pytest.raises((sqlite_stream.StreamFailed, pa.ArrowInvalid), match=message):
        list(sqlite_stream._checked(_stream(batches, count, cut=cut)))


def test_the_parent_takes_a_stream_that_checks_out() -> None:
    got = list(sqlite_stream._checked(_stream([["", "a"], [], ["b", "c"]], 3)))
    assert [batch.column(0).to_pylist() for batch in got] == [["a"], ["b", "c"]]


# --- the child's process -------------------------------------------------------------------


def _child(code: str, request: dict[str, Any]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(request).encode(),
        capture_output=True,
        timeout=120,
    )


def test_the_child_refuses_to_run_beside_pythons_sqlite(tmp_path: Path) -> None:
    request = {"uri": "file:none?mode=ro", "sql": "SELECT 1", "count_sql": "SELECT 1", "rows": 1}
    code = "import sqlite3\nfrom recarchive.export.sqlite_stream import main\nmain()"
    refused = _child(code, request)
    assert refused.returncode != 0 and b"sqlite3 is loaded" in refused.stderr
    # The control: the same request without sqlite3 loaded gets past that check.
    ran = _child("from recarchive.export.sqlite_stream import main\nmain()", request)
    assert b"sqlite3 is loaded" not in ran.stderr


def test_the_exporting_process_never_loads_adbcs_sqlite(sqlite_engine: Engine) -> None:
    fill(sqlite_engine, 4)
    url = str(sqlite_engine.url)
    code = (
        "import sys, tempfile\n"
        "from recarchive.export import rows, sqlite_stream\n"
        "rows.CHILD_READER_ROWS = 0\n"
        "from recarchive.export.parquet import export_changed\n"
        "from recarchive.store.engine import create_engine_for\n"
        "calls = []\n"
        "real = sqlite_stream.stream\n"
        "sqlite_stream.stream = lambda *a, **k: calls.append(1) or real(*a, **k)\n"
        f"report = export_changed(create_engine_for({url!r}), tempfile.mkdtemp())\n"
        "print(report.rows, len(calls), sorted(m for m in sys.modules if m.startswith('adbc')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout.decode().split(maxsplit=2) == ["4", "2", "[]\n"]


def test_a_stream_given_up_early_stops_its_child(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(sqlite_engine, 40)
    children: list[subprocess.Popen[bytes]] = []
    real = subprocess.Popen

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        children.append(real(*args, **kwargs))
        return children[-1]

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(export_rows, "FETCH_ROWS", 2)
    with sqlite_engine.connect() as connection:
        batches = export_rows.partition_batches(connection, "2025-07")
        next(batches)
        batches.close()
    assert len(children) == 1 and children[0].returncode is not None
