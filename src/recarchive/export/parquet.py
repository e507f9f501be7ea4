"""Export of the analyst Parquet dataset from SQL, one monthly partition at a time.

The layout and schemas are :mod:`recarchive.export.schema`'s. A partition is rewritten whole
from SQL: a temp file in the same folder, then ``os.replace`` (locally), or one upload of a
finished local file (``s3://bucket/prefix`` roots), so a reader never sees half a partition or
a recording twice. Rows are streamed from SQL per partition, so memory holds one row group, not
the table. Which partitions are due is kept in the ``export_partitions`` table
(:mod:`recarchive.store.partitions`): its ``version`` grows with every change, and the export
records the version it wrote only if the partition did not change again while it was writing.

Exports of one database run one at a time (:func:`recarchive.export.lock.export_lock`), and
the pipeline keeps writing while an export runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
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
from sqlalchemy import Connection, Engine, Select, and_, select
from sqlalchemy.exc import SQLAlchemyError

from recarchive.errors import ConfigError, StorageUnavailableError
from recarchive.export.lock import EXPORT_LOCK_TIMEOUT, export_lock
from recarchive.export.schema import (
    FILE_NAME,
    PARTIES_SCHEMA,
    RECORDINGS_SCHEMA,
    TABLE_SCHEMAS,
    TIMESTAMP,
)
from recarchive.model import PARTY_FIELDS, PARTY_ROLES, RECORDING_FIELDS, LedgerState
from recarchive.store.partitions import due_partitions, mark_partitions, record_exported
from recarchive.store.tables import archive_ledger, recording_parties, recordings

logger = logging.getLogger(__name__)

#: Rows per Parquet row group: large enough for DuckDB's and Athena's scans.
ROW_GROUP_ROWS = 128 * 1024
#: Rows fetched from SQL per round trip.
FETCH_ROWS = 5000


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
    if sqlite and kind == TIMESTAMP:
        # SQLite holds naive UTC text ('YYYY-MM-DD HH:MM:SS.ffffff'): parse it in Arrow.
        return pa.array(values, pa.string()).cast(pa.timestamp("us")).cast(TIMESTAMP)
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
    with export_lock(engine, lock_timeout) as still_locked:
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
