"""The export's child reader on SQLite (recarchive.export.sqlite_stream): same files, or none.

The child reads a partition through ADBC's SQLite driver in a process of its own. What it
gives must be what the database driver's path gives, byte for byte; and whatever goes wrong in
it (a stream cut short, rows missing or out of order, no sentinel, a crash) must end in the
driver's path for that partition, never in a file with the wrong rows.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import Engine, text, update

from recarchive.errors import StorageUnavailableError
from recarchive.export import partition_file, sqlite_stream
from recarchive.export import rows as export_rows
from recarchive.export.parquet import export_changed
from recarchive.store.archive import ArchiveStore
from recarchive.store.engine import create_engine_for, read_only_sqlite_uri, upgrade_database
from recarchive.store.tables import recording_parties, recordings
from tests.test_parquet import AUGUST, JULY, normalized

FALLBACK = "reading it through the database driver instead"


@pytest.fixture(autouse=True)
def child_for_every_partition(monkeypatch: pytest.MonkeyPatch) -> None:
    """The child reads partitions of any size here (by default only from 1,000 recordings, in
    exports of 20,000 or more)."""
    monkeypatch.setattr(export_rows, "CHILD_READER_ROWS", 0)
    monkeypatch.setattr(export_rows, "CHILD_PARTITION_ROWS", 0)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every child stream started (by its URI), so a test knows the child path ran."""
    started: list[str] = []
    real = sqlite_stream.Reader.stream

    def spy(reader: sqlite_stream.Reader, *args: Any, **kwargs: Any) -> Iterator[pa.RecordBatch]:
        started.append(reader.uri)
        return real(reader, *args, **kwargs)

    monkeypatch.setattr(sqlite_stream.Reader, "stream", spy)
    return started


@pytest.fixture
def children(monkeypatch: pytest.MonkeyPatch) -> list[subprocess.Popen[bytes]]:
    """Every child process started."""
    started: list[subprocess.Popen[bytes]] = []
    real = subprocess.Popen

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        started.append(real(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", popen)
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


@pytest.fixture
def expected(
    sqlite_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, bytes]:
    """40 recordings in two partitions, and the files the driver's path writes of them."""
    fill(sqlite_engine, 40)
    return driver_files(sqlite_engine, tmp_path / "driver", monkeypatch)


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


def test_a_small_export_is_read_without_a_child(
    sqlite_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: list[str]
) -> None:
    monkeypatch.setattr(export_rows, "CHILD_READER_ROWS", 13)  # July has 6, August 6
    fill(sqlite_engine)
    export_changed(sqlite_engine, str(tmp_path / "a"))
    assert calls == []
    fill(sqlite_engine, 14)  # now 7 each: 14 together
    export_changed(sqlite_engine, str(tmp_path / "b"))
    assert len(calls) == 2


def test_a_small_partition_is_read_without_the_child(
    sqlite_engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    calls: list[str],
    children: list[subprocess.Popen[bytes]],
) -> None:
    monkeypatch.setattr(export_rows, "CHILD_PARTITION_ROWS", 7)
    fill(sqlite_engine, 13)  # July 6, August 7
    expected = driver_files(sqlite_engine, tmp_path / "driver", monkeypatch)
    report = export_changed(sqlite_engine, str(tmp_path / "child"), full=True)
    assert report.rows == 13 and len(calls) == 1 and len(children) == 1
    assert files(tmp_path / "child") == expected


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        # The parent looks for another sentinel than the child's: every stream fails its check.
        pytest.param(
            "_SENTINEL_ID", "not the sentinel", "did not start with its sentinel", id="check"
        ),
        # The child's query fails: the warning carries the child's own last line.
        pytest.param(
            "sentinel_sql",
            lambda sql, schema: "SELECT * FROM nowhere",
            "no such table: nowhere",
            id="crash",
        ),
    ],
)
def test_a_child_that_fails_or_does_not_check_out_falls_back_and_says_why(
    sqlite_engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    calls: list[str],
    caplog: pytest.LogCaptureFixture,
    name: str,
    value: Any,
    reason: str,
) -> None:
    fill(sqlite_engine)
    expected = driver_files(sqlite_engine, tmp_path / "driver", monkeypatch)
    monkeypatch.setattr(sqlite_stream, name, value)
    with caplog.at_level(logging.WARNING, logger="recarchive"):
        report = export_changed(sqlite_engine, str(tmp_path / "child"), full=True)
    assert report.rows == 12 and len(calls) == 2
    assert caplog.text.count(FALLBACK) == 2
    assert reason in caplog.text
    assert files(tmp_path / "child") == expected


def test_one_child_reads_every_partition_of_an_export(
    expected: dict[str, bytes],
    sqlite_engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    calls: list[str],
    children: list[subprocess.Popen[bytes]],
) -> None:
    report = export_changed(sqlite_engine, str(tmp_path / "child"), full=True)
    assert report.rows == 40 and len(calls) == 2
    # One start-up for both partitions, and the child ended cleanly at the export's end.
    assert len(children) == 1 and children[0].returncode == 0
    assert files(tmp_path / "child") == expected


def test_after_a_failed_stream_the_next_partition_gets_a_new_child(
    expected: dict[str, bytes],
    sqlite_engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    children: list[subprocess.Popen[bytes]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    real = sqlite_stream._checked
    seen: list[int] = []

    def first_fails(source: Any) -> Iterator[pa.RecordBatch]:
        seen.append(1)
        if len(seen) == 1:
            next(real(source))  # the child is mid-stream when the parent gives up
            raise sqlite_stream.StreamFailed("made to fail")
        return real(source)

    monkeypatch.setattr(sqlite_stream, "_checked", first_fails)
    with caplog.at_level(logging.WARNING, logger="recarchive"):
        report = export_changed(sqlite_engine, str(tmp_path / "child"), full=True)
    assert report.rows == 40 and caplog.text.count(FALLBACK) == 1
    assert len(children) == 2 and [child.returncode for child in children] == [-9, 0]
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
        "rows.CHILD_READER_ROWS = rows.CHILD_PARTITION_ROWS = 0\n"
        "from recarchive.export.parquet import export_changed\n"
        "from recarchive.store.engine import create_engine_for\n"
        "calls = []\n"
        "real = sqlite_stream.Reader.stream\n"
        "sqlite_stream.Reader.stream = lambda *a, **k: calls.append(1) or real(*a, **k)\n"
        f"report = export_changed(create_engine_for({url!r}), tempfile.mkdtemp())\n"
        "print(report.rows, len(calls), sorted(m for m in sys.modules if m.startswith('adbc')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout.decode().split(maxsplit=2) == ["4", "2", "[]\n"]


def test_a_stream_given_up_early_stops_its_child(
    sqlite_engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    children: list[subprocess.Popen[bytes]],
) -> None:
    fill(sqlite_engine, 40)
    monkeypatch.setattr(export_rows, "FETCH_ROWS", 2)
    with sqlite_engine.connect() as connection:
        reader = export_rows.child_reader(connection, ["2025-07", "2025-08"])
    assert reader is not None
    with sqlite_engine.connect() as connection, reader:
        batches = export_rows.partition_batches(connection, "2025-07", reader)
        next(batches)
        batches.close()
        assert len(children) == 1 and children[0].returncode is not None
        # The next partition gets a child of its own, and all of its rows.
        rows = sum(
            pair[0].num_rows
            for pair in export_rows.partition_batches(connection, "2025-08", reader)
        )
    assert rows == 20 and len(children) == 2 and children[1].returncode == 0


# --- what the review of the child reader found (each failed before its fix) -------------------


def test_a_path_with_uri_characters_opens_that_file_and_only_read_only(
    tmp_path: Path, calls: list[str]
) -> None:
    folder = tmp_path / "runs #2"
    folder.mkdir()
    decoy = tmp_path / "runs "  # what an unescaped URI names: the text before "#"
    engine = create_engine_for(f"sqlite:///{folder / 'db.sqlite'}")
    try:
        upgrade_database(engine)
        fill(engine, 4)
        export_changed(engine, str(tmp_path / "out"))
    finally:
        engine.dispose()
    assert len(calls) == 2 and not decoy.exists()
    assert pq.read_table(tmp_path / "out" / "recordings").num_rows == 4


@pytest.mark.parametrize("name", ["a#b.db", "a?b=1.db", "a%41.db", "a b.db"])
def test_the_read_only_uri_names_exactly_its_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute("CREATE TABLE t (v)")
        connection.execute("INSERT INTO t VALUES (1)")
        connection.commit()
    uri = read_only_sqlite_uri(str(path))
    assert uri is not None
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as connection:
        assert connection.execute("SELECT count(*) FROM t").fetchone() == (1,)
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            connection.execute("DELETE FROM t")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing else created


@pytest.mark.timeout(120)
def test_a_child_that_writes_much_to_stderr_does_not_hang_the_export(
    sqlite_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: list[str]
) -> None:
    fill(sqlite_engine, 4)
    monkeypatch.setenv("PYTHONVERBOSE", "1")  # every import to stderr: far more than a pipe holds
    report = export_changed(sqlite_engine, str(tmp_path / "out"))
    assert report.rows == 4 and len(calls) == 2


def test_text_that_is_not_utf8_is_never_written(
    sqlite_engine: Engine, tmp_path: Path, calls: list[str]
) -> None:
    fill(sqlite_engine, 4)
    with sqlite_engine.begin() as connection:
        connection.execute(text("UPDATE recordings SET conference_id = CAST(x'c328ff' AS TEXT)"))
    with pytest.raises(StorageUnavailableError):
        export_changed(sqlite_engine, str(tmp_path / "out"))
    assert calls  # the child read it first, and refused it
    assert list((tmp_path / "out").rglob("*.parquet")) == []


def test_a_write_that_fails_stops_the_child(
    sqlite_engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    children: list[subprocess.Popen[bytes]],
) -> None:
    fill(sqlite_engine, 40)
    monkeypatch.setattr(export_rows, "FETCH_ROWS", 2)

    def full_disk(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(partition_file.PartitionFile, "add", full_disk)
    with pytest.raises(StorageUnavailableError, match="No space left"):
        export_changed(sqlite_engine, str(tmp_path / "out"))
    assert len(children) == 1 and children[0].returncode is not None
    assert [t.name for t in threading.enumerate() if t.name == "recarchive-export-reader"] == []


def test_the_child_does_not_import_from_the_working_directory(
    sqlite_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: list[str]
) -> None:
    fill(sqlite_engine, 4)
    stray = tmp_path / "cwd"
    stray.mkdir()
    (stray / "json.py").write_text("raise SystemExit('imported from the working directory')\n")
    monkeypatch.chdir(stray)
    report = export_changed(sqlite_engine, str(tmp_path / "out"))
    assert report.rows == 4 and len(calls) == 2


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("'not a time'", id="text-not-a-time"),  # ArrowInvalid
        pytest.param("12345", id="integer-in-a-timestamp"),  # ArrowTypeError
    ],
)
def test_a_value_that_does_not_convert_stops_the_child_and_is_a_clear_error(
    sqlite_engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    children: list[subprocess.Popen[bytes]],
    caplog: pytest.LogCaptureFixture,
    value: str,
) -> None:
    # The child's batch fails to convert in this process, between two of the child's
    # batches: its stream is closed there (not when collected), the partition is read again
    # through the driver, which cannot convert it either and says so, without the value.
    fill(sqlite_engine, 40)
    monkeypatch.setattr(export_rows, "FETCH_ROWS", 2)
    with sqlite_engine.begin() as connection:
        connection.execute(text(f"UPDATE recordings SET fetched_at = {value} WHERE id > ''"))
    with (
        caplog.at_level(logging.WARNING, logger="recarchive"),
        pytest.raises(StorageUnavailableError, match="does not convert") as raised,
    ):
        export_changed(sqlite_engine, str(tmp_path / "out"))
    assert "not a time" not in str(raised.value) and "12345" not in str(raised.value)
    assert caplog.text.count(FALLBACK) == 1
    assert [t.name for t in threading.enumerate() if t.name == "recarchive-export-reader"] == []
    assert len(children) == 1 and children[0].returncode == -9
    assert list((tmp_path / "out").rglob("*.parquet")) == []


def test_a_stream_read_on_after_its_reader_closed_fails_at_once(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(sqlite_engine, 40)
    monkeypatch.setattr(export_rows, "FETCH_ROWS", 2)
    with sqlite_engine.connect() as connection:
        reader = export_rows.child_reader(connection, ["2025-07"])
        assert reader is not None
        batches = export_rows.partition_batches(connection, "2025-07", reader)
        next(batches)
        reader.close()
        with pytest.raises(sqlite_stream.StreamFailed, match="closed"):
            list(batches)  # neither the batches left in the queue nor a wait for ever


def test_a_child_that_died_between_two_partitions_is_replaced(
    expected: dict[str, bytes],
    sqlite_engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    children: list[subprocess.Popen[bytes]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    real = sqlite_stream.Reader.stream

    def killed_after(reader: sqlite_stream.Reader, *args: Any, **kwargs: Any) -> Any:
        yield from real(reader, *args, **kwargs)
        children[-1].kill()  # idle, between this partition and the next
        children[-1].wait()

    monkeypatch.setattr(sqlite_stream.Reader, "stream", killed_after)
    with caplog.at_level(logging.WARNING, logger="recarchive"):
        report = export_changed(sqlite_engine, str(tmp_path / "child"), full=True)
    assert report.rows == 40 and FALLBACK not in caplog.text
    assert [child.returncode for child in children] == [-9, -9]  # one for each partition
    assert files(tmp_path / "child") == expected


def test_a_child_that_cannot_start_falls_back_to_the_driver(
    expected: dict[str, bytes],
    sqlite_engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:

    def no_processes(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(subprocess, "Popen", no_processes)
    with caplog.at_level(logging.WARNING, logger="recarchive"):
        report = export_changed(sqlite_engine, str(tmp_path / "child"), full=True)
    assert report.rows == 40 and caplog.text.count(FALLBACK) == 2
    assert "Resource temporarily unavailable" in caplog.text
    assert files(tmp_path / "child") == expected


def test_a_database_that_cannot_say_what_is_due_is_a_clear_error(
    sqlite_engine: Engine, tmp_path: Path
) -> None:
    fill(sqlite_engine, 4)
    with sqlite_engine.begin() as connection:
        connection.execute(text("DROP TABLE export_partitions"))
    with pytest.raises(StorageUnavailableError, match="which Parquet partitions are due"):
        export_changed(sqlite_engine, str(tmp_path / "out"))


def _pipe_holding_child(monkeypatch: pytest.MonkeyPatch, pid_file: Path) -> None:
    """Children become ``sh``, whose background ``sleep`` keeps the pipes open after ``sh`` is
    killed (as a process stuck in the kernel would). Popen returns once that sleep runs and its
    pid is in ``pid_file``: a kill before then would find nothing holding the pipe."""
    real = subprocess.Popen

    def holder(command: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        started = real(
            [
                "sh",
                "-c",
                f"sleep 60 & echo $! > {pid_file}.tmp; mv {pid_file}.tmp {pid_file}; exec sleep 60",
            ],
            **kwargs,
        )
        for _ in range(200):
            if pid_file.exists():
                break
            time.sleep(0.05)
        return started

    monkeypatch.setattr(subprocess, "Popen", holder)


def _kill_holder(pid_file: Path) -> None:
    if pid_file.exists():
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


def _assert_abandoned_readers_end() -> None:
    """An abandoned reading thread ends once the last holder of its pipe is gone."""
    for thread in threading.enumerate():
        if thread.name == "recarchive-export-reader":
            thread.join(10)
            assert not thread.is_alive()


def test_a_reader_whose_read_outlives_its_killed_child_is_retired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Not only a stall: any end of a stream whose read survives the kill retires the reader
    (a second child would likely hang the same way, and be waited for again)."""
    pid_file = tmp_path / "holder.pid"
    _pipe_holding_child(monkeypatch, pid_file)
    monkeypatch.setattr(sqlite_stream, "STOP_SECONDS", 0.5)
    reader = sqlite_stream.Reader("file:unused?mode=ro")
    try:
        child = reader._started()
        assert child.stdout is not None
        reader._reading = sqlite_stream._Ahead(sqlite_stream._checked(child.stdout), 2, None)
        with caplog.at_level(logging.WARNING, logger="recarchive"):
            reader.close()  # as when a partition's write failed mid-stream
        assert reader.retired and "did not end when its child was killed" in caplog.text
        assert child.returncode == -9
    finally:
        _kill_holder(pid_file)
    _assert_abandoned_readers_end()


# A count that never ends: the child computes for ever and writes nothing (a wedged child).
_ENDLESS_COUNT = (
    "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT count(*) FROM n"
)


def _wedged_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    real = sqlite_stream.Reader.stream

    def wedged(reader: sqlite_stream.Reader, sql: str, count_sql: str, **kwargs: Any) -> Any:
        return real(reader, sql, _ENDLESS_COUNT, **kwargs)

    monkeypatch.setattr(sqlite_stream.Reader, "stream", wedged)


def test_a_wedged_child_is_given_up_and_its_partition_read_through_the_driver(
    expected: dict[str, bytes],
    sqlite_engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    children: list[subprocess.Popen[bytes]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _wedged_streams(monkeypatch)
    monkeypatch.setattr(sqlite_stream, "STALL_SECONDS", 0.5)
    with caplog.at_level(logging.WARNING, logger="recarchive"):
        report = export_changed(sqlite_engine, str(tmp_path / "child"), full=True)
    assert report.rows == 40 and caplog.text.count(FALLBACK) == 1
    assert "gave nothing for 0.5 s" in caplog.text
    # Killed, none left behind; and the second partition did not wait for a second child.
    assert "reads its other partitions through the database driver" in caplog.text
    assert [child.returncode for child in children] == [-9]
    assert files(tmp_path / "child") == expected


def test_a_child_whose_kill_leaves_its_pipe_open_does_not_hold_the_export(
    expected: dict[str, bytes],
    sqlite_engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A process stuck in the kernel survives SIGKILL with its pipe open: here a grandchild
    holds the pipe after the child is killed. Its reading thread is abandoned, not joined."""
    pid_file = tmp_path / "holder.pid"
    _pipe_holding_child(monkeypatch, pid_file)
    monkeypatch.setattr(sqlite_stream, "STALL_SECONDS", 0.5)
    monkeypatch.setattr(sqlite_stream, "STOP_SECONDS", 0.5)
    try:
        with caplog.at_level(logging.WARNING, logger="recarchive"):
            report = export_changed(sqlite_engine, str(tmp_path / "child"), full=True)
        assert report.rows == 40 and files(tmp_path / "child") == expected
        assert "gave nothing for 0.5 s" in caplog.text
    finally:
        _kill_holder(pid_file)
    _assert_abandoned_readers_end()


def test_control_without_the_stall_limit_a_wedged_child_holds_the_export(
    sqlite_engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    children: list[subprocess.Popen[bytes]],
) -> None:
    """The control of the test above: what the limit cuts short is a wait with no end."""
    fill(sqlite_engine, 40)
    _wedged_streams(monkeypatch)
    monkeypatch.setattr(sqlite_stream, "STALL_SECONDS", None)  # Queue.get(timeout=None)
    done: list[int] = []
    export = threading.Thread(
        target=lambda: done.append(export_changed(sqlite_engine, str(tmp_path)).rows),
        daemon=True,
    )
    export.start()
    try:
        export.join(3)
        assert export.is_alive() and not done, "the export ended without the limit"
    finally:
        for _ in range(120):  # let it go: a killed child's stream fails, the driver reads
            for child in children:  # the second partition's too, once it has started
                child.kill()
            export.join(0.5)
            if not export.is_alive():
                break
    assert done == [40]


# A REAL with a fraction, written by hand where SQLite's column holds integers (or booleans):
# pyarrow's conversion of a float to an integer type dropped the fraction without an error, so
# the driver's path wrote 1 for 1.5 and False for 0.5, where the child's path refused them. A
# BOOLEAN column (no CHECK constraint) took any number: 2 and -1 became True, and 300 failed
# the driver's path but not the child's.
_NOT_INTEGRAL = [
    pytest.param("UPDATE archive_ledger SET size_bytes = 1.5", id="size-bytes"),
    pytest.param("UPDATE recordings SET stereo = 0.5 WHERE id > ''", id="boolean-fraction"),
    pytest.param("UPDATE recordings SET stereo = 2 WHERE id > ''", id="boolean-2"),
    pytest.param("UPDATE recordings SET transcription = -1 WHERE id > ''", id="boolean-minus-1"),
    pytest.param("UPDATE recordings SET stereo = 300 WHERE id > ''", id="boolean-300"),
    pytest.param(
        "UPDATE recording_parties SET number_anonymous = 0.5 WHERE role = 'originator'",
        id="party-boolean",
    ),
]


def _ledger_rows(engine: Engine, state: str) -> None:
    with engine.begin() as connection:
        ids = connection.execute(text("SELECT id FROM recordings ORDER BY id")).scalars().all()
        connection.execute(
            text(
                "INSERT INTO archive_ledger (recording_id, state, s3_bucket, s3_key, size_bytes,"
                " sha256, created_at, updated_at) VALUES (:id, :state, 'b', :id, 7,"
                " :sha, '2025-07-01 00:00:00', '2025-07-01 00:00:00')"
            ),
            [{"id": recording_id, "state": state, "sha": "0" * 64} for recording_id in ids],
        )


@pytest.mark.parametrize("child", [False, True], ids=["driver", "child"])
@pytest.mark.parametrize("sql", _NOT_INTEGRAL)
def test_a_value_that_is_no_integer_where_sql_holds_integers_is_refused_not_changed(
    sqlite_engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sql: str,
    child: bool,
) -> None:
    fill(sqlite_engine, 40)
    _ledger_rows(sqlite_engine, "archived")
    if not child:
        monkeypatch.setattr(sqlite_stream, "available", lambda: False)
    export_changed(sqlite_engine, str(tmp_path / "before"), full=True)  # the control: it works
    sizes = pq.read_table(tmp_path / "before" / "recordings").column("media_size_bytes")
    assert set(sizes.to_pylist()) == {7}
    with sqlite_engine.begin() as connection:
        connection.execute(text(sql))
    with pytest.raises(StorageUnavailableError, match="does not convert") as raised:
        export_changed(sqlite_engine, str(tmp_path / "after"), full=True)
    assert not any(value in str(raised.value) for value in ("0.5", "1.5", "300"))
    assert list((tmp_path / "after").rglob("*.parquet")) == []


@pytest.mark.parametrize("child", [False, True], ids=["driver", "child"])
def test_a_size_the_export_does_not_show_fails_nothing(
    sqlite_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, child: bool
) -> None:
    # Only an archived row's size is exported: a failed row's odd value changes no file.
    fill(sqlite_engine, 40)
    _ledger_rows(sqlite_engine, "failed")
    if not child:
        monkeypatch.setattr(sqlite_stream, "available", lambda: False)
    export_changed(sqlite_engine, str(tmp_path / "before"), full=True)
    with sqlite_engine.begin() as connection:
        connection.execute(text("UPDATE archive_ledger SET size_bytes = 1.5"))
    report = export_changed(sqlite_engine, str(tmp_path / "after"), full=True)
    assert report.rows == 40
    assert files(tmp_path / "after") == files(tmp_path / "before")
    sizes = pq.read_table(tmp_path / "after" / "recordings").column("media_size_bytes")
    assert set(sizes.to_pylist()) == {None}
