"""Export of the analyst Parquet dataset from SQL, one monthly partition at a time.

Layout (DESIGN §2)::

    {root}/recordings/created_month=YYYY-MM/part-0.parquet
    {root}/recording_parties/created_month=YYYY-MM/part-0.parquet

A partition is rewritten whole from SQL: a temp file in the same folder, then ``os.replace``
(locally), or one upload of a finished local file (``s3://bucket/prefix`` roots), so a reader
never sees half a partition or a recording twice. Rows are streamed from SQL per partition,
so memory holds one row group, not the table. Which partitions are due is kept in the
``export_partitions`` table: its ``version`` grows with every change, and the export records
the version it wrote only if the partition did not change again while it was writing
(:mod:`recarchive.store.partitions`).

Exports of one database run one at a time (:func:`_export_lock`): a PostgreSQL advisory lock,
or on SQLite an ``flock`` on a file beside the database, never a SQL write lock, so the
pipeline keeps writing while an export runs. Without it, a slower export holding an older
snapshot could replace a partition file after a newer export wrote and marked it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs
from sqlalchemy import Connection, Engine, Select, and_, select, text
from sqlalchemy.exc import SQLAlchemyError

from recarchive.errors import ConfigError, StorageUnavailableError
from recarchive.model import PARTY_FIELDS, PARTY_ROLES, RECORDING_FIELDS, LedgerState
from recarchive.store.partitions import due_partitions, mark_partitions, record_exported
from recarchive.store.tables import archive_ledger, recording_parties, recordings

logger = logging.getLogger(__name__)

#: Rows per Parquet row group: large enough for DuckDB's and Athena's scans.
ROW_GROUP_ROWS = 128 * 1024
#: Rows fetched from SQL per round trip.
FETCH_ROWS = 5000
FILE_NAME = "part-0.parquet"
#: Seconds an export waits for another export of the same database before it gives up. An
#: export of a few million recordings takes minutes (docs/benchmarks.md); half an hour is far
#: beyond a healthy one, so a longer wait means the other export is stuck.
EXPORT_LOCK_TIMEOUT = 30 * 60.0
#: Key of the PostgreSQL advisory lock held by a running export ("parquetx"; the schema
#: upgrade's key in :mod:`recarchive.store.engine` is another).
_EXPORT_LOCK_KEY = 0x7061727175657478
#: Suffix of the SQLite lock file, beside the database file (like SQLite's ``-wal``).
LOCK_FILE_SUFFIX = ".export-lock"
#: Longest pause between two tries of a busy lock, and how often a waiter says it still waits.
_POLL_MAX_SECONDS = 0.5
_WAIT_LOG_SECONDS = 60.0

_TS = pa.timestamp("us", tz="UTC")

_RECORDING_TYPES: dict[str, pa.DataType] = {
    "id": pa.string(),
    "workspace_id": pa.string(),
    "source": pa.string(),
    "source_id": pa.string(),
    "channel_id": pa.string(),
    "status": pa.string(),
    "direction": pa.string(),
    "origin": pa.string(),
    "duration": pa.float64(),
    "stereo": pa.bool_(),
    "format": pa.string(),
    "transcription": pa.bool_(),
    "conference_id": pa.string(),
    "url": pa.string(),
    "room_info_url": pa.string(),
    "created_at": _TS,
    "updated_at": _TS,
    "ended_at": _TS,
    "started_at": _TS,
}
_PARTY_TYPES: dict[str, pa.DataType] = {
    name: pa.bool_() if name == "number_anonymous" else pa.string() for name in PARTY_FIELDS
}

#: Schema of ``recordings`` files: flattened parties, media and ledger columns. The partition
#: column ``created_month`` comes from the folder name (hive partitioning), not the file.
RECORDINGS_SCHEMA = pa.schema(
    [pa.field(name, _RECORDING_TYPES[name]) for name in RECORDING_FIELDS]
    + [pa.field("fetched_at", _TS)]
    + [
        pa.field(f"{role}_{name}", _PARTY_TYPES[name])
        for role in PARTY_ROLES
        for name in PARTY_FIELDS
    ]
    + [
        pa.field("media_s3_uri", pa.string()),
        pa.field("media_sha256", pa.string()),
        pa.field("media_size_bytes", pa.int64()),
        pa.field("archived_at", _TS),
        pa.field("ledger_state", pa.string()),
    ]
)

#: Schema of ``recording_parties`` files.
PARTIES_SCHEMA = pa.schema(
    [pa.field("recording_id", pa.string()), pa.field("role", pa.string())]
    + [pa.field(name, _PARTY_TYPES[name]) for name in PARTY_FIELDS]
)

TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "recordings": RECORDINGS_SCHEMA,
    "recording_parties": PARTIES_SCHEMA,
}


@dataclass
class ExportReport:
    """What an export wrote.

    Attributes:
        rows: Recordings rows written (all partitions).
        partitions: ``YYYY-MM`` partitions rewritten.
        seconds: Wall time.
    """

    rows: int
    partitions: list[str] = field(default_factory=list)
    seconds: float = 0.0


# --- SQL side ------------------------------------------------------------------------------


def _recordings_query(month: str) -> Select[Any]:
    parties = {role: recording_parties.alias(role) for role in PARTY_ROLES}
    joined: Any = recordings
    for role, alias in parties.items():
        joined = joined.outerjoin(
            alias, and_(alias.c.recording_id == recordings.c.id, alias.c.role == role)
        )
    joined = joined.outerjoin(archive_ledger, archive_ledger.c.recording_id == recordings.c.id)
    columns: list[Any] = [recordings.c[name] for name in (*RECORDING_FIELDS, "fetched_at")]
    columns += [
        parties[role].c[name].label(f"{role}_{name}")
        for role in PARTY_ROLES
        for name in PARTY_FIELDS
    ]
    columns += [
        archive_ledger.c.s3_bucket,
        archive_ledger.c.s3_key,
        archive_ledger.c.sha256,
        archive_ledger.c.size_bytes,
        archive_ledger.c.archived_at,
        archive_ledger.c.state,
    ]
    return (
        select(*columns)
        .select_from(joined)
        .where(recordings.c.created_month == month)
        .order_by(recordings.c.id)
    )


def _parties_query(month: str) -> Select[Any]:
    columns = [recording_parties.c[name] for name in PARTIES_SCHEMA.names]
    return (
        select(*columns)
        .select_from(
            recording_parties.join(recordings, recordings.c.id == recording_parties.c.recording_id)
        )
        .where(recordings.c.created_month == month)
        .order_by(recordings.c.id, recording_parties.c.role)
    )


def _raw_partitions(connection: Connection, query: Select[Any]) -> Iterator[Sequence[Any]]:
    """Stream the rows of ``query`` as the driver returns them, ``FETCH_ROWS`` at a time.

    The export skips SQLAlchemy's per-value result processing (it dominated the export's
    time): timestamps and booleans are converted column-wise by Arrow in :func:`_batch`.
    """
    compiled = query.compile(dialect=connection.dialect)
    params: Any = (
        tuple(compiled.params[name] for name in compiled.positiontup or ())
        if compiled.positional
        else compiled.params
    )
    result = connection.execution_options(stream_results=True).exec_driver_sql(
        str(compiled), params
    )
    yield from result.partitions(FETCH_ROWS)


def _recording_batches(connection: Connection, month: str) -> Iterator[pa.RecordBatch]:
    plain = len(RECORDING_FIELDS) + 1 + len(PARTY_ROLES) * len(PARTY_FIELDS)
    sqlite = connection.dialect.name == "sqlite"
    for rows in _raw_partitions(connection, _recordings_query(month)):
        columns: list[Sequence[Any]] = list(zip(*rows, strict=True))
        bucket, key, sha256, size, archived_at, state = columns[plain:]
        archived = [value == LedgerState.ARCHIVED for value in state]
        media_uri = [
            f"s3://{b}/{k}" if ok and b and k else None
            for ok, b, k in zip(archived, bucket, key, strict=True)
        ]
        columns[plain:] = [
            media_uri,
            [v if ok else None for ok, v in zip(archived, sha256, strict=True)],
            [v if ok else None for ok, v in zip(archived, size, strict=True)],
            [v if ok else None for ok, v in zip(archived, archived_at, strict=True)],
            state,
        ]
        yield _batch(columns, RECORDINGS_SCHEMA, sqlite)


def _party_batches(connection: Connection, month: str) -> Iterator[pa.RecordBatch]:
    sqlite = connection.dialect.name == "sqlite"
    for rows in _raw_partitions(connection, _parties_query(month)):
        yield _batch(list(zip(*rows, strict=True)), PARTIES_SCHEMA, sqlite)


def _array(values: Sequence[Any], kind: pa.DataType, sqlite: bool) -> pa.Array:
    if sqlite and kind == _TS:
        # SQLite holds naive UTC text ('YYYY-MM-DD HH:MM:SS.ffffff'): parse it in Arrow.
        return pa.array(values, pa.string()).cast(pa.timestamp("us")).cast(_TS)
    if sqlite and kind == pa.bool_():
        return pa.array(values, pa.int8()).cast(pa.bool_())
    return pa.array(values, type=kind, from_pandas=False)


def _batch(columns: Sequence[Sequence[Any]], schema: pa.Schema, sqlite: bool) -> pa.RecordBatch:
    arrays = [
        _array(values, item.type, sqlite) for values, item in zip(columns, schema, strict=True)
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _mark_again(engine: Engine, month: str) -> None:
    """Make ``month`` due again (its file may be older than its marks say)."""
    try:
        with engine.begin() as connection:
            mark_partitions(connection, [month])
    except SQLAlchemyError as exc:
        logger.warning("could not mark partition %s for the next export: %s", month, exc)


# --- one export at a time ------------------------------------------------------------------
#
# Why a lock and not a compare-and-swap on the partition version: the mark already is one
# (:func:`recarchive.store.partitions.record_exported`), but the file replace (``os.replace``,
# an S3 PUT) is outside the
# database, and no conditional UPDATE can stop an export with an older snapshot from replacing
# the file after a newer export wrote and marked it. A lock held from before the due partitions
# are read until the last mark makes each export see everything the previous one did, and file
# writes happen in snapshot order. It is one lock for the whole export, not one per partition:
# every export walks the partitions in the same order, so per-partition locks would mostly make
# a second export trail the first one partition behind, and it has nothing to do anyway once
# the first finished (it reads the due partitions after taking the lock).

#: Exports of in-memory SQLite databases: such a database exists in this process only, so
#: every export that can see it runs here, and a process-wide lock serializes them.
_IN_PROCESS_LOCK = threading.Lock()


def _wait_for_lock(try_lock: Callable[[], bool], what: str, timeout: float) -> None:
    """Call ``try_lock`` until it succeeds; log the wait; give up after ``timeout`` seconds.

    Polling (rather than a blocking lock call) lets the waiter say at INFO that it waits, and
    for how long, and stop at a deadline on every backend alike.

    Raises:
        StorageUnavailableError: The lock was still held by another export after ``timeout``.
    """
    if try_lock():
        return
    started = time.monotonic()
    deadline = started + timeout
    logger.info(
        "waiting for another Parquet export of this database to finish (%s; gives up after %.0f s)",
        what,
        timeout,
    )
    next_log = started + _WAIT_LOG_SECONDS
    delay = 0.02
    while True:
        now = time.monotonic()
        if now >= deadline:
            raise StorageUnavailableError(
                f"another Parquet export of this database still runs after {timeout:g} s of "
                f"waiting ({what}); let it finish, or stop it if it is stuck, then run "
                "`recarchive export`"
            )
        if now >= next_log:
            logger.info("still waiting for another Parquet export (%.0f s so far)", now - started)
            next_log += _WAIT_LOG_SECONDS
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 2, _POLL_MAX_SECONDS)
        if try_lock():
            waited = time.monotonic() - started
            logger.info("the other Parquet export finished; exporting after %.1f s", waited)
            return


@contextlib.contextmanager
def _postgres_lock(engine: Engine, timeout: float) -> Iterator[Callable[[], None]]:
    """Hold the export's session-level advisory lock on a dedicated connection.

    The connection is in autocommit mode, so it is never left idle in a transaction (holding
    back vacuum) for the length of the export. If the session ends, the server drops the lock;
    the yielded check fails then, before the export writes another partition.
    """
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:

        def try_lock() -> bool:
            statement = text("SELECT pg_try_advisory_lock(:key)")
            return bool(connection.execute(statement, {"key": _EXPORT_LOCK_KEY}).scalar())

        def check() -> None:
            try:
                connection.execute(text("SELECT 1"))
            except SQLAlchemyError as exc:
                raise StorageUnavailableError(
                    f"lost the Parquet export lock (its PostgreSQL session ended: {exc}); "
                    "run `recarchive export` again"
                ) from exc

        _wait_for_lock(try_lock, f"advisory lock {_EXPORT_LOCK_KEY:#x}", timeout)
        try:
            yield check
        finally:
            try:
                connection.execute(
                    text("SELECT pg_advisory_unlock(:key)"), {"key": _EXPORT_LOCK_KEY}
                )
            except SQLAlchemyError:
                # Never hand a session that may still hold the lock back to the pool: closing
                # it releases every lock it holds.
                connection.invalidate()


def _sqlite_file(engine: Engine) -> str:
    """Path of the SQLite main database file; ``""`` for an in-memory or temporary one."""
    with engine.connect().execution_options(recarchive_read_only=True) as connection:
        rows = connection.exec_driver_sql("PRAGMA database_list").all()
        connection.rollback()
    return next((str(row[2] or "") for row in rows if row[1] == "main"), "")


def _open_lock_file(path: str) -> int:
    """Open (creating) the lock file; read-only when it belongs to another user.

    A local ``flock`` needs no write access, so an export run by another user (a manual
    ``recarchive export`` next to the scheduled one) still takes the same lock. Read-write
    comes first because over NFS ``flock`` becomes a POSIX lock, which needs it.
    """
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except PermissionError:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


@contextlib.contextmanager
def _sqlite_lock(engine: Engine, timeout: float) -> Iterator[Callable[[], None]]:
    """Hold an exclusive ``flock`` on the lock file beside the SQLite database.

    SQLite is embedded, so every export of a database file runs on its host, and a file lock
    there serializes them without any SQL lock: the pipeline's write transactions go on. The
    file is never removed (removing it would let two exports lock two different files). The
    lock belongs to the open file, so the kernel drops it when the process dies, and two
    exports in two threads of one process exclude each other too (POSIX record locks,
    ``fcntl.lockf``, are per process and would not).
    """
    database = _sqlite_file(engine)
    if not database:
        _wait_for_lock(
            lambda: _IN_PROCESS_LOCK.acquire(blocking=False), "in-memory database", timeout
        )
        try:
            yield lambda: None
        finally:
            _IN_PROCESS_LOCK.release()
        return
    path = database + LOCK_FILE_SUFFIX
    try:
        descriptor = _open_lock_file(path)
    except OSError as exc:
        raise StorageUnavailableError(f"cannot open the export lock file {path}: {exc}") from exc

    def try_lock() -> bool:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise StorageUnavailableError(f"cannot lock {path}: {exc}") from exc
        return True

    try:
        _wait_for_lock(try_lock, f"lock file {path}", timeout)
        yield lambda: None
    finally:
        os.close(descriptor)  # releases the lock


@contextlib.contextmanager
def _export_lock(engine: Engine, timeout: float) -> Iterator[Callable[[], None]]:
    """Hold the lock that lets one export of ``engine``'s database run at a time.

    Yields:
        A check to call before each partition: it raises
        :class:`~recarchive.errors.StorageUnavailableError` if the lock was lost.
    """
    if engine.dialect.name == "postgresql":
        with _postgres_lock(engine, timeout) as check:
            yield check
    else:
        with _sqlite_lock(engine, timeout) as check:
            yield check


# --- file side -----------------------------------------------------------------------------


class _Target:
    """Where partition files go: a local folder or an S3 prefix."""

    def __init__(self, root: str, s3_endpoint_url: str | None) -> None:
        self.s3: pafs.S3FileSystem | None = None
        if root.startswith("s3://"):
            self.s3 = _s3_filesystem(s3_endpoint_url)
            self.base = root.removeprefix("s3://").rstrip("/")
        else:
            self.base = str(Path(root))

    def folder(self, table: str, month: str) -> str:
        return f"{self.base}/{table}/created_month={month}"

    def write(
        self,
        table: str,
        month: str,
        batches: Iterator[pa.RecordBatch],
        before_replace: Callable[[], None] = lambda: None,
    ) -> int:
        """Write one partition file whole; with no rows, remove the partition instead.

        ``before_replace`` runs just before the visible file changes (the export lock's
        check: an export that lost its lock must not replace a newer export's file).
        """
        folder = self.folder(table, month)
        if self.s3 is None:
            Path(folder).mkdir(parents=True, exist_ok=True)
            temp_dir = folder
        else:
            temp_dir = tempfile.gettempdir()
        # Not ending in .parquet: readers globbing *.parquet never see a file being written.
        temp = Path(temp_dir) / f".{FILE_NAME}.{uuid.uuid4().hex}.tmp"
        try:
            rows = _write_file(temp, TABLE_SCHEMAS[table], batches)
            before_replace()
            if rows == 0:
                self._remove_partition(folder)
                return 0
            if self.s3 is None:
                temp.replace(Path(folder) / FILE_NAME)  # atomic (os.replace)
                _fsync_dir(Path(folder))
            else:
                with (
                    temp.open("rb") as source,
                    self.s3.open_output_stream(f"{folder}/{FILE_NAME}") as sink,
                ):
                    shutil.copyfileobj(source, sink, 1024 * 1024)
            return rows
        finally:
            temp.unlink(missing_ok=True)

    def _remove_partition(self, folder: str) -> None:
        if self.s3 is None:
            shutil.rmtree(folder, ignore_errors=True)
            return
        with contextlib.suppress(FileNotFoundError, OSError):
            self.s3.delete_dir(folder)


def _write_file(path: Path, schema: pa.Schema, batches: Iterator[pa.RecordBatch]) -> int:
    rows = 0
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for batch in batches:
            pending.append(batch)
            pending_rows += batch.num_rows
            if pending_rows >= ROW_GROUP_ROWS:
                writer.write_table(
                    pa.Table.from_batches(pending, schema), row_group_size=ROW_GROUP_ROWS
                )
                rows += pending_rows
                pending, pending_rows = [], 0
        if pending_rows or rows == 0:
            writer.write_table(
                pa.Table.from_batches(pending, schema), row_group_size=ROW_GROUP_ROWS
            )
            rows += pending_rows
    with path.open("rb") as handle:
        os.fsync(handle.fileno())
    return rows


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _s3_filesystem(endpoint_url: str | None) -> pafs.S3FileSystem:
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    if not endpoint_url:
        return pafs.S3FileSystem(region=region)
    parts = urlsplit(endpoint_url)
    if not parts.scheme or not parts.netloc:
        raise ConfigError("RECARCHIVE_S3_ENDPOINT_URL: expected a URL like http://host:port")
    return pafs.S3FileSystem(
        region=region,
        endpoint_override=parts.netloc,
        scheme=parts.scheme,
        allow_bucket_creation=False,
    )


# --- entry point ---------------------------------------------------------------------------


def export_changed(
    engine: Engine,
    root: str,
    *,
    s3_endpoint_url: str | None = None,
    full: bool = False,
    lock_timeout: float = EXPORT_LOCK_TIMEOUT,
) -> ExportReport:
    """Rewrite the Parquet partitions changed since the last export (all with ``full``).

    Exports of one database run one at a time: one started while another runs waits for it
    (saying so at INFO), then rewrites only what is still due.

    Args:
        engine: The SQL store's engine.
        root: Dataset root: a local folder or ``s3://bucket/prefix``.
        s3_endpoint_url: S3-compatible endpoint for ``s3://`` roots.
        full: Rewrite every partition present in SQL.
        lock_timeout: Seconds to wait for another export of the same database.

    Returns:
        Rows and partitions written.

    Raises:
        StorageUnavailableError: A partition file could not be written, another export still
            ran after ``lock_timeout``, or the lock was lost during the export.
        ConfigError: The S3 endpoint setting is not a URL.
    """
    started = time.monotonic()
    target = _Target(root, s3_endpoint_url)
    report = ExportReport(rows=0)
    with _export_lock(engine, lock_timeout) as still_locked:
        # Read under the lock: what a previous export wrote and marked is not due any more.
        # A deferred (read-only) transaction on SQLite: the export must not block writers.
        with engine.connect().execution_options(recarchive_read_only=True) as connection:
            due = due_partitions(connection, full)
            connection.rollback()
        for month, version in due.items():
            still_locked()
            try:
                with engine.connect().execution_options(recarchive_read_only=True) as connection:
                    rows = target.write(
                        "recordings", month, _recording_batches(connection, month), still_locked
                    )
                    target.write(
                        "recording_parties",
                        month,
                        _party_batches(connection, month),
                        still_locked,
                    )
                    connection.rollback()
                # The lock may have been lost between the check and the replace: then this
                # (perhaps older) file may have replaced a newer export's, so the month is
                # marked changed again and the next export rewrites it.
                still_locked()
            except StorageUnavailableError:
                _mark_again(engine, month)
                raise
            except OSError as exc:
                raise StorageUnavailableError(
                    f"could not write Parquet partition {month} under {root}: {exc}"
                ) from exc
            report.rows += rows
            report.partitions.append(month)
            if version is not None:
                with engine.begin() as connection:
                    record_exported(connection, month, version)
    report.seconds = time.monotonic() - started
    return report
