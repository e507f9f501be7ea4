"""One Parquet export of a database at a time: the export lock.

A PostgreSQL session advisory lock, or on SQLite an ``flock`` on a file beside the database
(a process-wide lock for in-memory databases), never a SQL write lock, so the pipeline keeps
writing while an export runs. Without it, a slower export holding an older snapshot could
replace a partition file after a newer export wrote and marked it.

Why a lock and not a compare-and-swap on the partition version: the mark already is one
(:func:`recarchive.store.partitions.record_exported`), but the file replace (``os.replace``, an
S3 PUT) is outside the database, and no conditional UPDATE can stop an export with an older
snapshot from replacing the file after a newer export wrote and marked it. A lock held from
before the due partitions are read until the last mark makes each export see everything the
previous one did, and file writes happen in snapshot order. It is one lock for the whole export,
not one per partition: every export walks the partitions in the same order, so per-partition
locks would mostly make a second export trail the first one partition behind, and it has
nothing to do anyway once the first finished (it reads the due partitions after taking the
lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from recarchive.errors import StorageUnavailableError

__all__ = ["EXPORT_LOCK_TIMEOUT", "LOCK_FILE_SUFFIX", "export_lock"]

logger = logging.getLogger(__name__)

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
def export_lock(engine: Engine, timeout: float) -> Iterator[Callable[[], None]]:
    """Hold the lock that lets one export of ``engine``'s database run at a time.

    Args:
        engine: The SQL store's engine: its database is what the lock is for.
        timeout: Seconds to wait for another export of the same database.

    Yields:
        A check to call before each partition: it raises
        :class:`~recarchive.errors.StorageUnavailableError` if the lock was lost.

    Raises:
        StorageUnavailableError: Another export still held the lock after ``timeout``, or the
            lock file could not be opened or locked.
    """
    if engine.dialect.name == "postgresql":
        with _postgres_lock(engine, timeout) as check:
            yield check
    else:
        with _sqlite_lock(engine, timeout) as check:
            yield check
