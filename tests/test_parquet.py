"""Parquet export and DuckDB query: layout, schema, atomic replace, marks, views, errors."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import Engine, select, text

from recarchive.errors import InputError, StorageUnavailableError
from recarchive.export import lock, parquet, partition_file
from recarchive.export import rows as export_rows
from recarchive.export.parquet import ExportReport, export_changed
from recarchive.export.query import run_query
from recarchive.export.schema import PARTIES_SCHEMA, RECORDINGS_SCHEMA
from recarchive.normalize import normalize_recording
from recarchive.store.archive import ArchiveStore
from recarchive.store.engine import create_engine_for, upgrade_database
from recarchive.store.tables import export_partitions
from tests.fixtures.postgres import fresh_postgres_database
from tests.test_normalize import REQUIRED, make_payload

JULY = datetime(2025, 7, 10, 2, 10, 43, 130000, tzinfo=UTC)
AUGUST = datetime(2025, 8, 3, 23, 59, 59, tzinfo=UTC)
SHA = "cd" * 32


def normalized(index: int, **kwargs: Any) -> Any:
    return normalize_recording(
        make_payload(index, **kwargs), workspace_id="ws-1", fetched_at=JULY + timedelta(days=1)
    )


def seed(store: ArchiveStore, count: int = 10) -> list[Any]:
    records = [normalized(i, created=JULY if i % 2 else AUGUST) for i in range(count)]
    store.save_metadata(records)
    return records


def due(engine: Engine) -> dict[str, bool]:
    with engine.connect() as connection:
        return {
            row.created_month: row.version > row.exported_version
            for row in connection.execute(select(export_partitions))
        }


def part(root: Path, table: str, month: str) -> Path:
    return root / table / f"created_month={month}" / "part-0.parquet"


# --- layout, schema, content -----------------------------------------------------------------


def test_export_layout_and_schema(engine: Engine, tmp_path: Path) -> None:
    store = ArchiveStore(engine)
    records = seed(store)
    root = tmp_path / "parquet"
    report = export_changed(engine, str(root))
    assert isinstance(report, ExportReport)
    assert report.rows == 10 and report.partitions == ["2025-07", "2025-08"]
    for month in ("2025-07", "2025-08"):
        recordings_file = pq.ParquetFile(part(root, "recordings", month))
        assert recordings_file.schema_arrow == RECORDINGS_SCHEMA
        assert recordings_file.metadata.row_group(0).column(0).compression == "ZSTD"
        assert pq.ParquetFile(part(root, "recording_parties", month)).schema_arrow == PARTIES_SCHEMA
    table = pq.read_table(part(root, "recordings", "2025-07"))
    assert table.num_rows == 5
    row = {name: table.column(name)[0].as_py() for name in table.column_names}
    source = next(r for r in records if r.id == row["id"])
    assert row["originator_number"] == source.parties[0]["number"]
    assert row["receiver_contact_id"] == "contact-desk"
    assert row["created_at"] == source.created_at
    assert row["ledger_state"] is None and row["media_s3_uri"] is None
    assert "?" not in row["url"]
    # Nothing changed since: the next export writes nothing.
    assert export_changed(engine, str(root)).partitions == []
    assert due(engine) == {"2025-07": False, "2025-08": False}


def test_all_null_columns_keep_their_types(engine: Engine, tmp_path: Path) -> None:
    store = ArchiveStore(engine)
    bare = {key: make_payload(0)[key] for key in REQUIRED}
    store.save_metadata([normalize_recording(bare, workspace_id="ws", fetched_at=JULY)])
    export_changed(engine, str(tmp_path))
    schema = pq.read_schema(part(tmp_path, "recordings", "2025-07"))
    assert schema == RECORDINGS_SCHEMA
    assert schema.field("duration").type == pa.float64()
    assert schema.field("ended_at").type == pa.timestamp("us", tz="UTC")
    assert schema.field("originator_number_anonymous").type == pa.bool_()
    assert schema.field("media_size_bytes").type == pa.int64()
    # No parties at all: the partition has no parties file, and the view still works.
    assert not part(tmp_path, "recording_parties", "2025-07").exists()
    _, rows = run_query(str(tmp_path), "SELECT count(*) FROM recording_parties")
    assert rows == [(0,)]


def test_archived_media_columns_and_duckdb_types(engine: Engine, tmp_path: Path) -> None:
    store = ArchiveStore(engine)
    records = seed(store, 4)
    target = records[1]
    store.register([r.id for r in records])
    store.claim([target.id], owner="a", lease_seconds=60, states={"pending"})
    store.mark_archived(
        target.id, owner="a", bucket="bkt", key="recordings/x.mp3", size_bytes=2048, sha256=SHA
    )
    export_changed(engine, str(tmp_path))
    columns, rows = run_query(
        str(tmp_path),
        "SELECT id, media_s3_uri, media_sha256, media_size_bytes, ledger_state, created_month, "
        "archived_at FROM recordings ORDER BY id",
    )
    by_id = {row[0]: dict(zip(columns, row, strict=True)) for row in rows}
    assert len(by_id) == 4
    archived = by_id[target.id]
    assert archived["media_s3_uri"] == "s3://bkt/recordings/x.mp3"
    assert archived["media_sha256"] == SHA and archived["media_size_bytes"] == 2048
    assert archived["ledger_state"] == "archived" and archived["archived_at"] is not None
    assert archived["created_month"] == "2025-07"
    others = [row for rid, row in by_id.items() if rid != target.id]
    assert all(row["ledger_state"] == "pending" and row["media_s3_uri"] is None for row in others)
    types = dict(
        run_query(str(tmp_path), "SELECT column_name, column_type FROM (DESCRIBE recordings)")[1]
    )
    assert types["created_at"] == "TIMESTAMP WITH TIME ZONE"
    assert types["duration"] == "DOUBLE" and types["stereo"] == "BOOLEAN"
    assert types["media_size_bytes"] == "BIGINT" and types["originator_number"] == "VARCHAR"
    assert types["created_month"] == "VARCHAR"


def test_three_stores_then_each_recording_once_with_latest(engine: Engine, tmp_path: Path) -> None:
    store = ArchiveStore(engine)
    root = str(tmp_path)
    seed(store, 50)
    export_changed(engine, root)
    seed(store, 50)
    assert export_changed(engine, root).partitions == []
    later = AUGUST + timedelta(days=3)  # after every createdAt (= the first updatedAt)
    third = [
        normalized(i, created=JULY if i % 2 else AUGUST, updated=later, status="completed")
        if i % 5 == 0
        else normalized(i, created=JULY if i % 2 else AUGUST)
        for i in range(50)
    ]
    store.save_metadata(third)
    export_changed(engine, root)
    _, rows = run_query(root, "SELECT id, status, updated_at FROM recordings")
    assert len(rows) == 50 and len({row[0] for row in rows}) == 50
    for recording_id, status, updated_at in rows:
        index = int(recording_id.replace("-", ""), 16) - 1
        assert status == ("completed" if index % 5 == 0 else "available")
        if index % 5 == 0:
            assert updated_at == later
    _, parties = run_query(
        root, "SELECT count(*), count(DISTINCT recording_id) FROM recording_parties"
    )
    assert parties == [(100, 50)]


def test_full_rewrites_every_partition(engine: Engine, tmp_path: Path) -> None:
    seed(ArchiveStore(engine), 6)
    export_changed(engine, str(tmp_path))
    part(tmp_path, "recordings", "2025-07").unlink()
    assert export_changed(engine, str(tmp_path)).partitions == []
    report = export_changed(engine, str(tmp_path), full=True)
    assert report.partitions == ["2025-07", "2025-08"] and report.rows == 6
    assert part(tmp_path, "recordings", "2025-07").exists()


def test_moved_recording_leaves_its_old_partition(sqlite_engine: Engine, tmp_path: Path) -> None:
    store = ArchiveStore(sqlite_engine)
    store.save_metadata([normalized(0, created=JULY)])
    export_changed(sqlite_engine, str(tmp_path))
    store.save_metadata([normalized(0, created=AUGUST)])
    report = export_changed(sqlite_engine, str(tmp_path))
    assert report.partitions == ["2025-07", "2025-08"]
    assert not part(tmp_path, "recordings", "2025-07").exists()
    _, rows = run_query(str(tmp_path), "SELECT created_month FROM recordings")
    assert rows == [("2025-08",)]


# --- atomicity and marks ----------------------------------------------------------------------


def test_failed_write_keeps_old_file_and_mark(
    sqlite_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ArchiveStore(sqlite_engine)
    root = tmp_path / "dataset"
    seed(store, 4)
    export_changed(sqlite_engine, str(root))
    old = part(root, "recordings", "2025-07").read_bytes()
    store.save_metadata(
        [normalized(1, created=JULY, status="completed", updated=JULY + timedelta(hours=1))]
    )

    def broken(*args: Any, **kwargs: Any) -> Iterator[tuple[pa.RecordBatch, pa.RecordBatch]]:
        yield (
            pa.RecordBatch.from_pylist([], schema=RECORDINGS_SCHEMA),
            pa.RecordBatch.from_pylist([], schema=PARTIES_SCHEMA),
        )
        raise OSError("disk full")

    monkeypatch.setattr(parquet, "partition_batches", broken)
    with pytest.raises(StorageUnavailableError, match="2025-07"):
        export_changed(sqlite_engine, str(root))
    assert part(root, "recordings", "2025-07").read_bytes() == old
    leftovers = [p.name for p in root.rglob("*") if p.is_file() and p.suffix != ".parquet"]
    assert leftovers == []
    assert due(sqlite_engine)["2025-07"] is True
    monkeypatch.undo()
    assert export_changed(sqlite_engine, str(root)).partitions == ["2025-07"]
    assert due(sqlite_engine)["2025-07"] is False


def test_mark_survives_a_change_during_export(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ArchiveStore(engine)
    seed(store, 4)
    original = parquet._Target.write
    changed = {"done": False}

    def write_and_change(self: Any, month: str, batches: Any, *hook: Any) -> int:
        rows = original(self, month, batches, *hook)
        if month == "2025-07" and not changed["done"]:
            changed["done"] = True
            # Another run stores a newer version while this export is still running.
            store.save_metadata(
                [normalized(1, created=JULY, status="completed", updated=JULY + timedelta(hours=2))]
            )
        return rows

    monkeypatch.setattr(parquet._Target, "write", write_and_change)
    export_changed(engine, str(tmp_path))
    assert due(engine) == {"2025-07": True, "2025-08": False}
    monkeypatch.undo()
    assert export_changed(engine, str(tmp_path)).partitions == ["2025-07"]
    _, rows = run_query(
        str(tmp_path),
        "SELECT status FROM recordings WHERE id = '00000000-0000-0000-0000-000000000002'",
    )
    assert rows == [("completed",)]


def test_temp_files_are_invisible_to_readers(sqlite_engine: Engine, tmp_path: Path) -> None:
    seed(ArchiveStore(sqlite_engine), 2)
    export_changed(sqlite_engine, str(tmp_path))
    folder = part(tmp_path, "recordings", "2025-07").parent
    (folder / ".part-0.parquet.deadbeef.tmp").write_bytes(b"half a file")
    _, rows = run_query(str(tmp_path), "SELECT count(*) FROM recordings")
    assert rows == [(2,)]


def test_row_groups_are_bounded(
    sqlite_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(partition_file, "ROW_GROUP_ROWS", 7)
    monkeypatch.setattr(export_rows, "FETCH_ROWS", 3)
    store = ArchiveStore(sqlite_engine)
    store.save_metadata([normalized(i, created=JULY) for i in range(30)])
    export_changed(sqlite_engine, str(tmp_path))
    meta = pq.ParquetFile(part(tmp_path, "recordings", "2025-07")).metadata
    assert meta.num_rows == 30
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sizes == [7, 7, 7, 7, 2]
    ids = pq.read_table(part(tmp_path, "recordings", "2025-07")).column("id").to_pylist()
    assert ids == sorted(ids) and len(set(ids)) == 30


_EXPORT_CHILD = """
import math
import sys
from pathlib import Path

from recarchive.store.archive import ArchiveStore
from recarchive.store.engine import create_engine_for, upgrade_database
from tests.test_parquet import seed

folder = Path(sys.argv[1])
url = f"sqlite:///{folder / 'db.sqlite'}"
engine = create_engine_for(url)
upgrade_database(engine)
seed(ArchiveStore(engine))
if sys.argv[2] == "command":
    from recarchive.cli.app import main

    sys.argv = ["recarchive", "export"]
    try:
        main()
    except SystemExit as exit:
        assert not exit.code, exit.code
else:
    from recarchive.export.parquet import export_changed

    export_changed(engine, str(folder / "parquet"))
imported = "pandas" in sys.modules
import pandas
import pyarrow as pa

rows = len(pandas.read_parquet(folder / "parquet" / "recordings"))
nulls = pa.array(pandas.Series([1.0, math.nan])).null_count
print(imported, rows, nulls)
"""


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("command", ["False", "10", "1"]), ("library", ["True", "10", "1"])],
    ids=["command", "library"],
)
def test_only_the_command_keeps_pyarrow_from_importing_pandas(
    tmp_path: Path, mode: str, expected: list[str]
) -> None:
    # pyarrow imports pandas, when installed, at its first conversion of a Python sequence
    # (93 MB, 0.3 s); the export never needs it. The recarchive command skips that import; a
    # library call (a flow, a notebook) leaves pyarrow's lookup alone, so pandas is imported
    # there (the control). In both, pandas then reads the dataset, and pyarrow converts a
    # Series the pandas way again (NaN a null) once a pandas function of pyarrow has run.
    folder = tmp_path / mode
    folder.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", _EXPORT_CHILD, str(folder), mode],
        cwd=Path(__file__).resolve().parents[1],
        env={
            **os.environ,
            "RECARCHIVE_DATABASE_URL": f"sqlite:///{folder / 'db.sqlite'}",
            "RECARCHIVE_PARQUET_ROOT": str(folder / "parquet"),
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-3:] == expected


# --- query ------------------------------------------------------------------------------------


def test_query_on_empty_dataset_has_views_with_columns(tmp_path: Path) -> None:
    columns, rows = run_query(str(tmp_path / "nothing-yet"), "SELECT * FROM recordings")
    assert rows == []
    assert columns == [*RECORDINGS_SCHEMA.names, "created_month"]
    columns, rows = run_query(str(tmp_path), "SELECT * FROM recording_parties")
    assert columns == [*PARTIES_SCHEMA.names, "created_month"]


@pytest.mark.parametrize(
    ("sql", "fragment"),
    [
        ("SELEC 1", "syntax error"),
        ("SELECT nope FROM recordings", "nope"),
        ("SELECT * FROM missing_table", "missing_table"),
    ],
)
def test_bad_sql_is_an_input_error(tmp_path: Path, sql: str, fragment: str) -> None:
    with pytest.raises(InputError, match="query failed") as info:
        run_query(str(tmp_path), sql)
    assert any(fragment in line for line in info.value.problems)


def test_query_reads_what_duckdb_reads_directly(sqlite_engine: Engine, tmp_path: Path) -> None:
    seed(ArchiveStore(sqlite_engine), 8)
    export_changed(sqlite_engine, str(tmp_path))
    direct = (
        duckdb.connect()
        .execute(
            "SELECT created_month, count(*) FROM read_parquet("
            f"'{tmp_path}/recordings/*/*.parquet', hive_partitioning = true) "
            "GROUP BY 1 ORDER BY 1"
        )
        .fetchall()
    )
    _, via = run_query(
        str(tmp_path), "SELECT created_month, count(*) FROM recordings GROUP BY 1 ORDER BY 1"
    )
    assert via == direct == [("2025-07", 4), ("2025-08", 4)]


# --- s3:// roots ------------------------------------------------------------------------------


def test_export_to_s3_root(
    sqlite_engine: Engine, s3_endpoint: str, s3_bucket: str, s3_client: Any
) -> None:
    store = ArchiveStore(sqlite_engine)
    store.save_metadata([normalized(i, created=JULY if i % 2 else AUGUST) for i in range(6)])
    root = f"s3://{s3_bucket}/analytics/v1"
    report = export_changed(sqlite_engine, root, s3_endpoint_url=s3_endpoint)
    assert report.partitions == ["2025-07", "2025-08"] and report.rows == 6
    listed = s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="analytics/v1/")
    keys = sorted(item["Key"] for item in listed.get("Contents", []))
    assert keys == [
        f"analytics/v1/{table}/created_month={month}/part-0.parquet"
        for table in ("recording_parties", "recordings")
        for month in ("2025-07", "2025-08")
    ]
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    body = s3_client.get_object(
        Bucket=s3_bucket, Key="analytics/v1/recordings/created_month=2025-07/part-0.parquet"
    )["Body"].read()
    table = pq.read_table(pa.BufferReader(body))
    assert table.schema == RECORDINGS_SCHEMA and table.num_rows == 3
    # A recording moving to another month leaves no copy behind in the old partition.
    store.save_metadata([normalized(1, created=AUGUST)])
    export_changed(sqlite_engine, root, s3_endpoint_url=s3_endpoint)
    body = s3_client.get_object(
        Bucket=s3_bucket, Key="analytics/v1/recordings/created_month=2025-08/part-0.parquet"
    )["Body"].read()
    assert pq.read_table(pa.BufferReader(body)).num_rows == 4
    body = s3_client.get_object(
        Bucket=s3_bucket, Key="analytics/v1/recordings/created_month=2025-07/part-0.parquet"
    )["Body"].read()
    assert pq.read_table(pa.BufferReader(body)).num_rows == 2
    # Nothing is left in the local temp folder.
    assert not list(Path(tempfile.gettempdir()).glob(".part-0.parquet.*.tmp"))


# --- concurrent exports -----------------------------------------------------------------------

#: Seconds a test waits for a thread before it fails (never a hang).
WAIT = 60.0
#: The July recording the racing tests change: ``normalized(1)``.
CHANGED_ID = "00000000-0000-0000-0000-000000000002"


class ExportThread(threading.Thread):
    """``export_changed`` in a thread, keeping its report or its error for the test."""

    def __init__(self, name: str, engine: Engine, root: Path, **kwargs: Any) -> None:
        super().__init__(name=name, daemon=True)
        self.engine, self.root, self.kwargs = engine, root, kwargs
        self.report: ExportReport | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0

    def run(self) -> None:
        started = time.monotonic()
        try:
            self.report = export_changed(self.engine, str(self.root), **self.kwargs)
        except BaseException as exc:  # handed to the test thread, which re-raises it
            self.error = exc
        finally:
            self.seconds = time.monotonic() - started

    def result(self) -> ExportReport:
        self.join(WAIT)
        assert not self.is_alive(), f"{self.name} did not finish within {WAIT} s"
        if self.error is not None:
            raise self.error
        assert self.report is not None
        return self.report


class PausedExport(ExportThread):
    """Export "A": pauses after it read its snapshot of July's recordings, before the replace.

    The seam is :meth:`parquet._Target.write`: the wrapper drains the batch iterator (the SQL
    rows of A's snapshot), signals ``snapshot_read``, waits for ``release``, then writes those
    rows. Only this thread pauses, and only once.
    """

    def __init__(
        self, engine: Engine, root: Path, monkeypatch: pytest.MonkeyPatch, **kwargs: Any
    ) -> None:
        super().__init__("export-A", engine, root, **kwargs)
        self.snapshot_read = threading.Event()
        self.release = threading.Event()
        original = parquet._Target.write

        def write(target: Any, month: str, batches: Iterator[Any], *hook: Any) -> int:
            pause = (
                threading.current_thread() is self
                and month == "2025-07"
                and not self.snapshot_read.is_set()
            )
            if not pause:
                return original(target, month, batches, *hook)
            rows = list(batches)
            self.snapshot_read.set()
            if not self.release.wait(WAIT):
                raise AssertionError("export A was never released")
            return original(target, month, iter(rows), *hook)

        monkeypatch.setattr(parquet._Target, "write", write)

    def start_paused(self) -> None:
        """Start A and return once it holds its July snapshot."""
        self.start()
        assert self.snapshot_read.wait(WAIT), "export A never reached its July write"


def waiting_logged(caplog: pytest.LogCaptureFixture) -> bool:
    return any(
        record.levelno == logging.INFO and "waiting for another Parquet export" in record.message
        for record in caplog.records
    )


def wait_until_waiting_or_done(export: ExportThread, caplog: pytest.LogCaptureFixture) -> None:
    """Block until ``export`` logs that it waits for another export, or finishes."""
    deadline = time.monotonic() + WAIT
    while export.is_alive() and not waiting_logged(caplog):
        assert time.monotonic() < deadline, f"{export.name} neither waited nor finished"
        time.sleep(0.01)


def newer_july() -> Any:
    return normalized(1, created=JULY, status="completed", updated=JULY + timedelta(hours=2))


def marks(engine: Engine) -> dict[str, tuple[int, int]]:
    with engine.connect() as connection:
        return {
            row.created_month: (row.version, row.exported_version)
            for row in connection.execute(select(export_partitions))
        }


def status_of(root: Path, recording_id: str) -> list[tuple[Any, ...]]:
    table = pq.read_table(part(root, "recordings", "2025-07"), columns=["id", "status"])
    return [(row["status"],) for row in table.to_pylist() if row["id"] == recording_id]


def test_a_slower_export_never_puts_an_older_snapshot_back(
    engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="recarchive.export.lock")
    store = ArchiveStore(engine)
    seed(store, 4)
    root = tmp_path / "dataset"
    export_a = PausedExport(engine, root, monkeypatch)
    export_a.start_paused()
    # While A holds its old snapshot, the pipeline stores a newer July, and export B runs.
    store.save_metadata([newer_july()])
    export_b = ExportThread("export-B", engine, root)
    export_b.start()
    wait_until_waiting_or_done(export_b, caplog)
    export_a.release.set()
    export_a.result()
    report_b = export_b.result()
    # The partition ends at the newest version: file and mark agree.
    assert status_of(root, CHANGED_ID) == [("completed",)]
    assert all(version == exported for version, exported in marks(engine).values())
    assert export_changed(engine, str(root)).partitions == []
    # B read what was due after A had finished, so it rewrote July only.
    assert waiting_logged(caplog)
    assert report_b.partitions == ["2025-07"]


def test_exports_started_together_all_finish_once(engine: Engine, tmp_path: Path) -> None:
    seed(ArchiveStore(engine), 10)
    root = tmp_path / "dataset"
    start = threading.Barrier(4)

    class Together(ExportThread):
        def run(self) -> None:
            start.wait(WAIT)
            super().run()

    exports = [Together(f"export-{n}", engine, root) for n in range(4)]
    for export in exports:
        export.start()
    reports = [export.result() for export in exports]
    # One export wrote both partitions; the others found nothing due once they had the lock.
    assert sorted(report.partitions for report in reports) == [
        [],
        [],
        [],
        ["2025-07", "2025-08"],
    ]
    assert due(engine) == {"2025-07": False, "2025-08": False}
    _, rows = run_query(str(root), "SELECT created_month, count(*) FROM recordings GROUP BY 1")
    assert sorted(rows) == [("2025-07", 5), ("2025-08", 5)]
    leftovers = [p.name for p in root.rglob("*") if p.is_file() and p.suffix != ".parquet"]
    assert leftovers == []


def test_a_paused_export_never_blocks_a_pipeline_write(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ArchiveStore(engine)
    seed(store, 4)
    root = tmp_path / "dataset"
    export_a = PausedExport(engine, root, monkeypatch)
    export_a.start_paused()
    # A holds the export lock and an open read snapshot; the pipeline writes meanwhile.
    started = time.monotonic()
    store.save_metadata([newer_july()])
    store.register([CHANGED_ID])
    assert time.monotonic() - started < 2.0
    export_a.release.set()
    assert export_a.result().partitions == ["2025-07", "2025-08"]
    assert due(engine) == {"2025-07": True, "2025-08": False}
    assert export_changed(engine, str(root)).partitions == ["2025-07"]
    assert status_of(root, CHANGED_ID) == [("completed",)]


def test_a_waiting_export_gives_up_with_a_clear_error(
    engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="recarchive.export.lock")
    seed(ArchiveStore(engine), 4)
    root = tmp_path / "dataset"
    export_a = PausedExport(engine, root, monkeypatch)
    export_a.start_paused()
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError, match="another Parquet export") as info:
        export_changed(engine, str(root), lock_timeout=0.5)
    waited = time.monotonic() - started
    assert "0.5 s" in str(info.value)
    assert 0.5 <= waited < 5.0
    assert waiting_logged(caplog)
    export_a.release.set()
    assert export_a.result().partitions == ["2025-07", "2025-08"]
    assert due(engine) == {"2025-07": False, "2025-08": False}


def test_in_memory_sqlite_exports_are_serialized_in_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An in-memory database lives in one process only: its exports share a process lock.
    engine = create_engine_for("sqlite://")
    try:
        upgrade_database(engine)
        seed(ArchiveStore(engine), 4)
        original = parquet._Target.write
        outcome: dict[str, BaseException | None] = {}

        def write(target: Any, month: str, batches: Iterator[Any], *hook: Any) -> int:
            if not outcome:
                other = ExportThread("export-B", engine, tmp_path / "other", lock_timeout=0.3)
                other.start()
                other.join(WAIT)
                outcome["error"] = other.error
            return original(target, month, batches, *hook)

        monkeypatch.setattr(parquet._Target, "write", write)
        report = export_changed(engine, str(tmp_path / "dataset"))
        assert report.partitions == ["2025-07", "2025-08"] and report.rows == 4
        assert isinstance(outcome["error"], StorageUnavailableError)
    finally:
        engine.dispose()


def test_sqlite_lock_is_a_file_lock_other_processes_see(
    sqlite_engine: Engine, tmp_path: Path
) -> None:
    seed(ArchiveStore(sqlite_engine), 2)
    lock_file = tmp_path / f"db.sqlite{lock.LOCK_FILE_SUFFIX}"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n",
            str(lock_file),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(StorageUnavailableError, match=str(lock_file)):
            export_changed(sqlite_engine, str(tmp_path / "dataset"), lock_timeout=0.3)
    finally:
        holder.kill()
        holder.wait(WAIT)
    # The holder is gone, and so is its lock (the file stays).
    assert export_changed(sqlite_engine, str(tmp_path / "dataset")).rows == 2
    assert lock_file.exists()


@pytest.mark.postgres
def test_a_lost_postgresql_lock_stops_the_export(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with fresh_postgres_database(postgres_url) as url:
        engine = create_engine_for(url)
        try:
            upgrade_database(engine)
            seed(ArchiveStore(engine), 4)
            export_a = PausedExport(engine, tmp_path / "dataset", monkeypatch)
            export_a.start_paused()
            # The session holding the advisory lock ends (an operator, a restart, a timeout).
            with engine.begin() as connection:
                ended = connection.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_locks "
                        "WHERE locktype = 'advisory' AND granted AND database = "
                        "(SELECT oid FROM pg_database WHERE datname = current_database())"
                    )
                ).scalars()
                assert list(ended) == [True]
            export_a.release.set()
            with pytest.raises(StorageUnavailableError, match="lost the Parquet export lock"):
                export_a.result()
            # A never replaced July after losing the lock, and marked it due again: nothing is
            # left locked or half done, and the next export writes July and August.
            assert export_changed(engine, str(tmp_path / "dataset")).partitions == [
                "2025-07",
                "2025-08",
            ]
            assert due(engine) == {"2025-07": False, "2025-08": False}
        finally:
            engine.dispose()
