"""Export of the analyst Parquet dataset from SQL, one monthly partition at a time.

The layout and schemas are :mod:`recarchive.export.schema`'s. A partition is rewritten whole
from SQL: a temp file in the same folder, then ``os.replace`` (locally), or one upload of a
finished local file (``s3://bucket/prefix`` roots), so a reader never sees half a partition or
a recording twice. Rows are streamed from SQL per partition (:mod:`recarchive.export.rows`), so
memory holds one row group, not the table; a file that comes out byte for byte the same as the
one in place is left alone. Which partitions are due is kept in the ``export_partitions`` table
(:mod:`recarchive.store.partitions`): its ``version`` grows with every change, and the export
records the version it wrote only if the partition did not change again while it was writing.
A file also records the PII policy it was written under (:mod:`recarchive.export.pii`): a
partition whose files carry another is due too, so a change of ``RECARCHIVE_PARQUET_PII`` or of
its key rewrites every partition on the next export, and one interrupted picks up where it was.

Exports of one database run one at a time (:func:`recarchive.export.lock.export_lock`), and
the pipeline keeps writing while an export runs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from recarchive.errors import StorageUnavailableError
from recarchive.export.lock import EXPORT_LOCK_TIMEOUT, export_lock
from recarchive.export.pandas_lookup import arrow_without_pandas
from recarchive.export.partition_file import PartitionFile, s3_filesystem, sync_folder
from recarchive.export.pii import METADATA_KEY, RAW, PiiPolicy
from recarchive.export.rows import child_reader, partition_batches
from recarchive.export.schema import FILE_NAME, TABLE_SCHEMAS
from recarchive.export.sqlite_stream import Reader, StreamFailed
from recarchive.store.partitions import due_partitions, mark_partitions, record_exported
from recarchive.tempfiles import EXPORT_SUFFIX, remove_orphan_temp_files, temp_prefix

logger = logging.getLogger(__name__)

#: A temp file of the naming before the owner was in it (see :meth:`_Target.sweep`).
_LEGACY_TEMP = re.compile(rf"\.{re.escape(FILE_NAME)}\.[0-9a-f]{{32}}\.tmp")
#: A partition folder's name.
_MONTH_FOLDER = re.compile(r"created_month=(\d{4}-\d{2})")
#: Bytes compared at a time between a new partition file and the one in place.
_COMPARE_BYTES = 1024 * 1024


@dataclass
class ExportReport:
    """What an export wrote.

    Attributes:
        rows: Recordings rows exported (all partitions).
        partitions: ``YYYY-MM`` partitions exported: each one's files now hold its rows.
        unchanged: Those of ``partitions`` whose files already held exactly these bytes and
            were left in place (nothing written).
        seconds: Wall time.
    """

    rows: int
    partitions: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    seconds: float = 0.0


# --- SQL side ------------------------------------------------------------------------------


def _mark_again(engine: Engine, month: str) -> None:
    """Make ``month`` due again (its file may be older than its marks say)."""
    try:
        with engine.begin() as connection:
            mark_partitions(connection, [month])
    except SQLAlchemyError as exc:
        logger.warning("could not mark partition %s for the next export: %s", month, exc)


def _said(exc: Exception) -> str:
    """What the database (or Arrow) said of a read that failed, without the value it read."""
    if isinstance(exc, pa.ArrowInvalid | pa.ArrowTypeError):
        return "a value that does not convert to its column's type"
    # SQLite's error for text that is not UTF-8 quotes the text after " with text ".
    return str(getattr(exc, "orig", None) or type(exc).__name__).split(" with text ", 1)[0]


# --- file side -----------------------------------------------------------------------------


class _Target:
    """Where partition files go: a local folder or an S3 prefix."""

    def __init__(self, root: str, s3_endpoint_url: str | None, tag: str | None) -> None:
        self.s3: pafs.S3FileSystem | None = None
        if root.startswith("s3://"):
            self.s3 = s3_filesystem(s3_endpoint_url)
            self.base = root.removeprefix("s3://").rstrip("/")
        else:
            self.base = str(Path(root))
        #: The PII policy's tag every file written gets (``None``: no metadata, ``raw``).
        self.tag = tag
        #: ``(table, month)`` of the files :meth:`write` found identical and left in place.
        self.unchanged: set[tuple[str, str]] = set()

    def folder(self, table: str, month: str) -> str:
        return f"{self.base}/{table}/created_month={month}"

    def sweep(self) -> int:
        """Remove the temp files that killed exports left behind; return how many.

        A temp file holds a partition's rows, callers' numbers included: left in a partition
        folder it outlives an ``erase`` of those recordings. Only files of processes of this
        host that no longer exist go (:func:`~recarchive.tempfiles.remove_orphan_temp_files`),
        and files of the naming before owners were in the names
        (``.part-0.parquet.{hex}.tmp``), which only a version without this sweep wrote.
        """
        if self.s3 is not None:
            return remove_orphan_temp_files(tempfile.gettempdir())
        removed = 0
        for table in TABLE_SCHEMAS:
            try:
                folders = [e.path for e in os.scandir(f"{self.base}/{table}") if e.is_dir()]
            except OSError:
                continue  # no such table folder yet
            for folder in folders:
                removed += remove_orphan_temp_files(folder)
                for legacy in Path(folder).glob(f".{FILE_NAME}.*.tmp"):
                    if _LEGACY_TEMP.fullmatch(legacy.name):
                        legacy.unlink(missing_ok=True)
                        removed += 1
        return removed

    def write(
        self,
        month: str,
        batches: Iterator[tuple[pa.RecordBatch, pa.RecordBatch]],
        before_replace: Callable[[], None] = lambda: None,
    ) -> int:
        """Write the partition's two files whole; return its ``recordings`` rows.

        ``batches`` are ``(recordings, recording_parties)`` pairs of one query
        (:func:`~recarchive.export.rows.partition_batches`): both files are written side by
        side to temp files, then each is put in place by :meth:`place`.
        """
        temps: dict[str, Path] = {}
        writers: dict[str, PartitionFile] = {}
        try:
            for table, schema in TABLE_SCHEMAS.items():
                folder = self.folder(table, month)
                if self.s3 is None:
                    Path(folder).mkdir(parents=True, exist_ok=True)
                    temp_dir = folder
                else:
                    temp_dir = tempfile.gettempdir()
                # Not ending in .parquet, and hidden: readers globbing *.parquet, and pyarrow's
                # dataset discovery (which skips "."), never see a file being written. Named
                # after this process, so the export after a killed one removes what it left
                # (:meth:`sweep`).
                temps[table] = temp = (
                    Path(temp_dir) / f".{temp_prefix()}{uuid.uuid4().hex}{EXPORT_SUFFIX}"
                )
                writers[table] = PartitionFile(temp, schema, self.tag)
            recordings, parties = writers.values()
            for recording_batch, party_batch in batches:
                recordings.add(recording_batch)
                parties.add(party_batch)
            counts = {table: writer.close() for table, writer in writers.items()}
            for table, rows in counts.items():
                self.place(table, month, temps[table], rows, before_replace)
            return counts["recordings"]
        finally:
            for writer in writers.values():
                writer.abort()
            for temp in temps.values():
                temp.unlink(missing_ok=True)

    def place(
        self, table: str, month: str, temp: Path, rows: int, before_replace: Callable[[], None]
    ) -> None:
        """Put the finished ``temp`` file of ``rows`` rows in place (none: remove the partition).

        ``before_replace`` runs just before the visible file changes (the export lock's
        check: an export that lost its lock must not replace a newer export's file). A file
        byte for byte the same as the one in place is not put there again (no rename, no S3
        PUT; ``(table, month)`` goes to :attr:`unchanged`): the Parquet writer is
        deterministic, so the same rows give the same bytes, and keeping the file in place
        is the same as replacing it.
        """
        folder = self.folder(table, month)
        before_replace()
        if rows == 0:
            if not self._exists(f"{folder}/{FILE_NAME}"):
                self.unchanged.add((table, month))
            self._remove_partition(folder)  # the folder made for the temp file too
            return
        if self._holds(f"{folder}/{FILE_NAME}", temp):
            self.unchanged.add((table, month))
            return
        if self.s3 is None:
            temp.replace(Path(folder) / FILE_NAME)  # atomic (os.replace)
            sync_folder(Path(folder))
        else:
            with (
                temp.open("rb") as source,
                self.s3.open_output_stream(f"{folder}/{FILE_NAME}") as sink,
            ):
                shutil.copyfileobj(source, sink, 1024 * 1024)

    def stale(self) -> set[str]:
        """Months with a partition file in place written under another PII policy.

        One listing per table and one footer read per file. A file that cannot be read as
        Parquet counts as stale: rewriting it from SQL is what it needs anyway.
        """
        fs: pafs.FileSystem = self.s3 or pafs.LocalFileSystem()
        base = self.base if self.s3 else Path(self.base).absolute().as_posix()
        months: set[str] = set()
        for table in TABLE_SCHEMAS:
            selector = pafs.FileSelector(f"{base}/{table}", allow_not_found=True, recursive=True)
            for info in fs.get_file_info(selector):
                folder, _, name = info.path.rpartition("/")
                found = _MONTH_FOLDER.fullmatch(folder.rpartition("/")[2])
                if info.type != pafs.FileType.File or name != FILE_NAME or not found:
                    continue
                month = found.group(1)
                if month in months:
                    continue
                try:
                    with fs.open_input_file(info.path) as handle:
                        metadata = pq.read_metadata(handle).metadata or {}
                except pa.ArrowInvalid:
                    months.add(month)
                    continue
                tag = metadata.get(METADATA_KEY.encode())
                if (tag.decode() if tag is not None else None) != self.tag:
                    months.add(month)
        return months

    def _exists(self, path: str) -> bool:
        if self.s3 is None:
            return Path(path).exists()
        return bool(self.s3.get_file_info(path).type == pafs.FileType.File)

    def _holds(self, path: str, local: Path) -> bool:
        """Whether the file at ``path`` has exactly the bytes of the ``local`` file."""
        size = local.stat().st_size
        if self.s3 is None:
            try:
                if Path(path).stat().st_size != size:
                    return False
            except FileNotFoundError:
                return False
            opener: Callable[[], Any] = functools.partial(open, path, "rb")
        else:
            s3 = self.s3
            info = s3.get_file_info(path)
            if info.type != pafs.FileType.File or info.size != size:
                return False
            opener = lambda: s3.open_input_stream(path)  # noqa: E731
        with opener() as existing, local.open("rb") as written:
            while chunk := written.read(_COMPARE_BYTES):
                if existing.read(len(chunk)) != chunk:
                    return False
        return True

    def _remove_partition(self, folder: str) -> None:
        if self.s3 is None:
            shutil.rmtree(folder, ignore_errors=True)
            return
        with contextlib.suppress(FileNotFoundError, OSError):
            self.s3.delete_dir(folder)


# --- entry point ---------------------------------------------------------------------------


def partition_files(root: str, *, s3_endpoint_url: str | None = None) -> int:
    """How many partition files a dataset at ``root`` holds (0 when there is none yet).

    ``rebuild`` asks before it exports: a dataset that survived the database may hold rows the
    archive cannot give back.

    Raises:
        StorageUnavailableError: The root cannot be listed.
    """
    target = _Target(root, s3_endpoint_url, None)
    filesystem = target.s3 or pafs.LocalFileSystem()
    try:
        found = filesystem.get_file_info(
            pafs.FileSelector(target.base, allow_not_found=True, recursive=True)
        )
    except OSError as exc:
        raise StorageUnavailableError(
            f"cannot list the Parquet root {root}: {type(exc).__name__}"
        ) from exc
    return sum(
        1 for info in found if info.type == pafs.FileType.File and info.path.endswith(".parquet")
    )


def _export_partition(
    engine: Engine,
    target: _Target,
    month: str,
    pii: PiiPolicy,
    still_locked: Callable[[], None],
    reader: Reader | None,
) -> int:
    """Write ``month``'s two files from SQL; return its recordings rows."""
    with (
        engine.connect().execution_options(recarchive_read_only=True) as connection,
        # Closed however the write ends: a child reader stops and ends its transaction.
        contextlib.closing(partition_batches(connection, month, reader)) as pairs,
    ):
        batches = (
            (pii.batch("recordings", recs), pii.batch("recording_parties", parties))
            for recs, parties in pairs
        )
        try:
            rows = target.write(month, batches, still_locked)
        finally:
            # Hand back what a partition freed (the allocator: export/memory.py): a flow's
            # process lives on after its export.
            pa.default_memory_pool().release_unused()
        connection.rollback()
    return rows


def export_changed(
    engine: Engine,
    root: str,
    *,
    s3_endpoint_url: str | None = None,
    full: bool = False,
    lock_timeout: float = EXPORT_LOCK_TIMEOUT,
    pii: PiiPolicy = RAW,
) -> ExportReport:
    """Rewrite the Parquet partitions changed since the last export (all with ``full``).

    Exports of one database run one at a time: one started while another runs waits for it
    (saying so at INFO), then rewrites only what is still due. Every partition exported is
    written from SQL; a file that comes out byte for byte the same as the one in place is left
    there, so ``full`` after no change writes nothing (and still puts back a deleted or
    altered file).

    Args:
        engine: The SQL store's engine.
        root: Dataset root: a local folder or ``s3://bucket/prefix``.
        s3_endpoint_url: S3-compatible endpoint for ``s3://`` roots.
        full: Rewrite every partition present in SQL.
        lock_timeout: Seconds to wait for another export of the same database.
        pii: What the files show of callers (``RECARCHIVE_PARQUET_PII``); partitions written
            under another policy are rewritten whatever ``full`` says.

    Returns:
        Rows and partitions written.

    Raises:
        StorageUnavailableError: A partition file could not be written, another export still
            ran after ``lock_timeout``, or the lock was lost during the export.
        ConfigError: The S3 endpoint setting is not a URL.
    """
    started = time.monotonic()
    arrow_without_pandas()
    target = _Target(root, s3_endpoint_url, pii.tag)
    report = ExportReport(rows=0)
    with export_lock(engine, lock_timeout) as still_locked, contextlib.ExitStack() as readers:
        try:
            target.sweep()
            stale = target.stale()
        except OSError as exc:
            raise StorageUnavailableError(
                f"could not read the Parquet partitions under {root}: {exc}"
            ) from exc
        # Read under the lock: what a previous export wrote and marked is not due any more.
        # A deferred (read-only) transaction on SQLite: the export must not block writers.
        try:
            with engine.connect().execution_options(recarchive_read_only=True) as connection:
                due = due_partitions(connection, full)
                # With ``full``: the partitions whose mark is due even without it.
                changed = set(due_partitions(connection, False) if full else due)
                if behind := stale - due.keys():
                    logger.info(
                        "%d Parquet partitions were written under another PII mode or key than "
                        "%s: rewriting them",
                        len(behind),
                        pii.mode,
                    )
                    versions = due_partitions(connection, True)
                    due = dict(sorted({**due, **{m: versions.get(m) for m in behind}}.items()))
                # Its child starts at the first partition it reads, and ends with the export.
                if (reader := child_reader(connection, due)) is not None:
                    readers.enter_context(reader)
                connection.rollback()
        except SQLAlchemyError as exc:
            raise StorageUnavailableError(
                f"could not read which Parquet partitions are due: {_said(exc)}"
            ) from exc
        for month, version in due.items():
            still_locked()
            try:
                try:
                    rows = _export_partition(engine, target, month, pii, still_locked, reader)
                except StreamFailed as exc:
                    logger.warning(
                        "partition %s: %s; reading it through the database driver instead",
                        month,
                        exc,
                    )
                    rows = _export_partition(engine, target, month, pii, still_locked, None)
                # The lock may have been lost between the check and the replace: then this
                # (perhaps older) file may have replaced a newer export's, so the month is
                # marked changed again and the next export rewrites it.
                still_locked()
            except StorageUnavailableError:
                _mark_again(engine, month)
                raise
            except (SQLAlchemyError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                # Text that is not UTF-8, or a value written by hand that does not convert.
                raise StorageUnavailableError(
                    f"could not read Parquet partition {month} from SQL: {_said(exc)}"
                ) from exc
            except OSError as exc:
                raise StorageUnavailableError(
                    f"could not write Parquet partition {month} under {root}: {exc}"
                ) from exc
            report.rows += rows
            report.partitions.append(month)
            kept = {(table, month) for table in TABLE_SCHEMAS} <= target.unchanged
            if kept:
                report.unchanged.append(month)
            # A kept partition that was not due is recorded already: nothing to write.
            if version is not None and not (kept and month not in changed):
                with engine.begin() as connection:
                    record_exported(connection, month, version)
    report.seconds = time.monotonic() - started
    return report
