"""A query's rows read from a SQLite file by a child process, as an Arrow stream (ADBC).

The export's fast path on SQLite (:func:`recarchive.export.rows.partition_batches`). ADBC's
SQLite driver (``adbc-driver-sqlite``) builds the rows' Arrow arrays in C: reading a partition
of 100,000 recordings costs ~1.3 s of CPU, against ~3.3 s through ``sqlite3``'s row tuples and
their conversion (docs/benchmarks.md); and the child reads while the export's process encodes
the Parquet files, on another core.

**Why a child process.** The driver carries its own copy of SQLite, linked in statically. Two
copies of SQLite in one process break each other's locks: POSIX advisory locks belong to the
process, so when one copy closes a file descriptor of the database (or of its ``-shm`` file),
every lock the *other* copy holds on that file is gone too, and another process may then
write, or reset the WAL index, under it (https://www.sqlite.org/howtocorrupt.html, 2.2.1).
The export runs in processes that write the same database (``archive``, the flows), so the
driver runs where nothing else opens it: a child that never imports Python's ``sqlite3``
(:func:`main` refuses to run if it is loaded), on a read-only URI.

**Why a sentinel row.** The driver infers each column's type from its first batch: a column
that is all NULL there becomes ``int64``, and a later string then fails the read; with 1.13.0
some batch sizes even dropped rows silently. So the child reads the query behind one first
row that holds a value of each column's own type, and the parent drops it. The parent then
checks what it got: the sentinel first, the IDs strictly ascending, and as many rows as the
count the child read in the same transaction (one snapshot). Any doubt raises
:class:`StreamFailed`, and the export reads that partition the slow way instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import subprocess
import sys
import tempfile
import threading
from collections.abc import Generator, Iterator
from typing import IO, Any

import pyarrow as pa
import pyarrow.compute as pc

from recarchive.errors import RecarchiveError

__all__ = ["Reader", "StreamFailed", "StreamStalled", "available", "sentinel_sql"]

logger = logging.getLogger(__name__)

#: The schema metadata key of the stream that carries the child's row count.
_ROWS_KEY = b"recarchive.rows"
#: The first value of the ID column: the sentinel row's (no recording has an empty ID).
_SENTINEL_ID = ""
#: Batches read ahead of the export (each ~3.5 MB of Arrow data at 5,000 recordings).
_AHEAD_BATCHES = 2
#: Lines of the child's stderr kept for an error message.
_STDERR_BYTES = 2000
#: The child waits for a lock at most ``_BUSY_TIMEOUT_MS``; past it a query fails by itself.
_BUSY_TIMEOUT_MS = 60_000
#: Seconds the parent waits for the child's next batch before it gives the stream up (the
#: child is killed and the partition read through the driver). Twice the child's own lock
#: wait: a child silent for that long is wedged (stopped, stuck on a dead disk, looping), and
#: without a limit the export, and the run it ends, would wait for ever.
STALL_SECONDS: float | None = 2 * _BUSY_TIMEOUT_MS / 1000
#: Seconds to wait for the reading thread, then for the child, once the child was killed. A
#: process stuck in the kernel (a dead disk) survives SIGKILL and keeps its pipe open: the
#: thread reading it and the process are then abandoned, not waited for.
STOP_SECONDS = 5.0


class StreamFailed(RecarchiveError):
    """The child's stream could not be read or did not check out (the caller reads otherwise)."""


class StreamStalled(StreamFailed):
    """The child gave nothing for :data:`STALL_SECONDS`: later streams would likely stall too."""


def available() -> bool:
    """Whether the ADBC SQLite driver is installed (a user may run without it)."""
    import importlib.util

    return importlib.util.find_spec("adbc_driver_sqlite") is not None


def sentinel_sql(sql: str, schema: pa.Schema) -> str:
    """``sql``'s rows behind one first row with a value of each column's type (``schema``'s).

    Text and timestamps (text in SQLite) get ``''``, floats ``0.0``, integers and booleans
    ``0``. ``sql`` must name the ID column first; its sentinel value is ``''``.
    """
    values = []
    for field in schema:
        if pa.types.is_floating(field.type):
            values.append("0.0")
        elif pa.types.is_integer(field.type) or pa.types.is_boolean(field.type):
            values.append("0")
        else:
            values.append("''")
    columns = ", ".join(
        f'{value} AS "{field.name}"' for value, field in zip(values, schema, strict=True)
    )
    # Our own compiled query and schema names, no value of any row: nothing to inject.
    return f"SELECT {columns} UNION ALL SELECT * FROM ({sql})"  # noqa: S608


class Reader:
    """One child process that reads query after query from one SQLite file, in order.

    The child starts at the first :meth:`stream` and serves every later one (its start-up,
    Python and pyarrow, is paid once per export, not once per partition). A stream that fails
    or is given up early ends the child; the next :meth:`stream` starts another.

    Args:
        uri: Read-only ``file:`` URI of the database.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        #: Set once a stream stalled, or its read outlived its child: the export reads no
        #: more partitions through it.
        self.retired = False
        self._child: subprocess.Popen[bytes] | None = None
        self._errors: IO[bytes] | None = None
        #: The thread reading the child's current stream, while one is open.
        self._reading: _Ahead | None = None

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def stream(
        self, sql: str, count_sql: str, *, batch_rows: int
    ) -> Generator[pa.RecordBatch, None, None]:
        """The rows of ``sql`` (made by :func:`sentinel_sql`), sentinel dropped.

        Args:
            sql: The query, its sentinel row first, its values in its text (no parameters).
            count_sql: A query of the number of rows ``sql`` gives (without the sentinel),
                read in the same transaction.
            batch_rows: Rows per batch.

        Yields:
            Record batches with the driver's types (text, ``int64``, ``double``), in order.

        Raises:
            StreamFailed: The child failed, or its rows did not check out; nothing it yielded
                before may be used.
        """
        if self._reading is not None:
            # One pipe, one stream at a time: a second would read the first one's bytes.
            raise StreamFailed("the SQLite reader is still giving another query's rows")
        finished = False
        failure: Exception | None = None
        child: subprocess.Popen[bytes] | None = None
        try:
            child = self._started()
            assert child.stdin is not None and child.stdout is not None
            request = {"uri": self.uri, "sql": sql, "count_sql": count_sql, "rows": batch_rows}
            child.stdin.write(json.dumps(request).encode() + b"\n")
            child.stdin.flush()
            self._reading = _Ahead(_checked(child.stdout), _AHEAD_BATCHES, STALL_SECONDS)
            yield from self._reading
            finished = True
        except (pa.ArrowException, OSError, ValueError) as exc:
            failure = exc
        except StreamStalled:
            # A stalled child would stall again, each later partition after the same wait.
            self._retire("child stalled")
            raise
        finally:
            errors = b""
            if finished:
                self._stop_reading()
            elif child is not None and child is self._child:
                # Not ended already by close() (or replaced by a later stream's child).
                errors = self._ended(kill=True)
        if failure is not None:
            raise StreamFailed(
                f"the SQLite reader failed ({type(failure).__name__}: {failure}; "
                f"its last words: {_last_line(errors)})"
            ) from failure

    def close(self) -> None:
        """End the child: it exits at the end of its input (killed if it has not in 5 s).

        Every stream it gave was checked whole as it was read: how it exits changes nothing. A
        stream still open (its reader gave up without closing it) is killed, its thread
        stopped before the pipes close.
        """
        self._ended(kill=self._reading is not None)

    def _started(self) -> subprocess.Popen[bytes]:
        if self._child is not None and self._child.poll() is not None:
            self._ended(kill=False)  # it died between two streams: start another
        if self._child is None:
            # stderr to a file, not a pipe: a child writing more than a pipe holds there (a
            # traceback, PYTHONVERBOSE) would wait for a reader while this process waits for
            # its stdout.
            errors = tempfile.TemporaryFile()  # noqa: SIM115 (closed in _ended)
            try:
                self._child = subprocess.Popen(
                    # -P: the working directory is not put on the child's import path.
                    [sys.executable, "-P", "-m", __name__],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=errors,
                )
            except BaseException:
                errors.close()
                raise
            self._errors = errors
        return self._child

    def _retire(self, why: str) -> None:
        """Read no more partitions through this reader (said once)."""
        if not self.retired:
            self.retired = True
            logger.warning(
                "the SQLite reader's %s: this export reads its other partitions through the "
                "database driver",
                why,
            )

    def _stop_reading(self) -> bool:
        """Wait for the current stream's thread (its source ended, or its child killed).

        Returns:
            Whether the thread ended (it is abandoned after :data:`STOP_SECONDS`).
        """
        reading, self._reading = self._reading, None
        return True if reading is None else reading.stop(STOP_SECONDS)

    def _ended(self, *, kill: bool) -> bytes:
        """Stop the child (``kill``, or by closing its input) and return its last stderr."""
        child, errors_file = self._child, self._errors
        self._child = self._errors = None
        if child is None or errors_file is None:
            return b""
        if kill:
            child.kill()  # ends the reading thread's read too
        # Before the pipe is closed under it. A thread still reading holds the pipe's lock, so
        # its close would wait as long as the read: the pipe is then left to the thread.
        read_ended = self._stop_reading()
        if not read_ended:
            # Its pipe outlived the kill: the next child would likely hang the same way.
            self._retire("read did not end when its child was killed")
        for pipe in (child.stdin, child.stdout if read_ended else None):
            with contextlib.suppress(OSError):
                if pipe is not None:
                    pipe.close()
        try:
            child.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            child.kill()
            try:
                child.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "the SQLite reader (pid %d) did not end when killed; left behind", child.pid
                )
        errors_file.seek(0, 2)
        errors_file.seek(max(0, errors_file.tell() - _STDERR_BYTES))
        errors = errors_file.read()
        errors_file.close()
        return errors


class _Ahead:
    """Items of ``source`` taken in a thread of their own, up to ``depth`` ahead of the reader.

    The child can write only as far as its pipe holds (64 KiB): read in this process's main
    thread, between two Parquet writes, it would wait for each one. Reading the stream here
    lets it work while the main thread encodes (pyarrow reads without the GIL). The reader
    waits at most ``stall_seconds`` for each item (``None``: for ever), then gets
    :class:`StreamStalled`.
    """

    def __init__(
        self, source: Iterator[pa.RecordBatch], depth: int, stall_seconds: float | None
    ) -> None:
        self._stall_seconds = stall_seconds
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(source,), name="recarchive-export-reader", daemon=True
        )
        self._thread.start()

    def _run(self, source: Iterator[pa.RecordBatch]) -> None:
        try:
            for item in source:
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as exc:  # handed to the reader, raised there
            self._put(("error", exc))

    def _put(self, entry: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        while True:
            try:
                kind, value = self._queue.get(timeout=self._stall_seconds)
            except queue.Empty:
                raise StreamStalled(
                    f"the SQLite reader gave nothing for {self._stall_seconds:g} s; given up"
                ) from None
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value

    def stop(self, timeout: float) -> bool:
        """Stop taking items and wait up to ``timeout`` for the thread (its source must end).

        A reader still iterating afterwards gets :class:`StreamFailed`, not the items left
        nor a wait for ever.

        Returns:
            Whether the thread ended; if not, it is a daemon left to its read.
        """
        self._stop.set()
        self._thread.join(timeout)
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._queue.put_nowait(("error", StreamFailed("the SQLite reader was closed")))
        return not self._thread.is_alive()


def _checked(source: IO[bytes]) -> Iterator[pa.RecordBatch]:
    reader = pa.ipc.open_stream(source)
    expected = int((reader.schema.metadata or {}).get(_ROWS_KEY, b"-1"))
    rows = 0
    last: pa.Scalar | None = None
    first = True
    for batch in reader:
        if first:
            ids = batch.column(0)
            if batch.num_rows == 0 or ids[0].as_py() != _SENTINEL_ID:
                raise StreamFailed("the SQLite reader's stream did not start with its sentinel")
            batch = batch.slice(1)
            first = False
        if batch.num_rows == 0:
            continue
        ids = batch.column(0)
        ordered = pc.all(pc.less(ids.slice(0, len(ids) - 1), ids.slice(1))).as_py()
        if ordered is False or (last is not None and not last.as_py() < ids[0].as_py()):
            raise StreamFailed("the SQLite reader's rows were not in ID order")
        last = ids[len(ids) - 1]
        # SQLite's TEXT may hold bytes that are not UTF-8, which the driver passes on as
        # strings: Arrow's full validation refuses them (ArrowInvalid), as sqlite3 does.
        batch.validate(full=True)
        rows += batch.num_rows
        yield batch.replace_schema_metadata(None)
    if first or rows != expected:
        raise StreamFailed(f"the SQLite reader gave {rows} rows where SQL counted {expected}")


def _last_line(errors: bytes) -> str:
    """The end of the child's stderr, on one line (an error's message and the query's line)."""
    lines = [line.strip() for line in errors.decode(errors="replace").splitlines()]
    said = " | ".join([line for line in lines if line][-3:])
    return said[-500:] if said else "nothing"


# --- the child ------------------------------------------------------------------------------


def main() -> None:
    """The child: for each request line on stdin, write its Arrow stream on stdout, in order.

    Each request is read in a transaction of its own (its count and its rows, one snapshot).
    The child ends at the end of its input.
    """
    # The driver manager's low-level API: its DB-API module imports pyarrow.dataset and, where
    # installed, pandas and polars (1.3 s per child in the dev environment).
    import adbc_driver_manager as adbc
    import adbc_driver_sqlite

    # See the module's docstring: Python's SQLite must not be in this process.
    if "_sqlite3" in sys.modules:
        raise SystemExit("recarchive: Python's sqlite3 is loaded; the ADBC reader refuses")
    sink = pa.output_stream(sys.stdout.buffer)
    with contextlib.ExitStack() as opened:
        connection: Any = None
        uri = None
        for line in sys.stdin.buffer:
            request = json.loads(line)
            if connection is None:
                uri = request["uri"]
                database = opened.enter_context(adbc_driver_sqlite.connect(uri))
                connection = opened.enter_context(adbc.AdbcConnection(database))
                # Autocommit off: each request's queries read in one transaction.
                connection.set_autocommit(False)
            elif request["uri"] != uri:
                raise SystemExit("recarchive: the ADBC reader serves one database")
            _serve(adbc, connection, request, sink)
            connection.rollback()  # the request's snapshot ends; the next one starts afresh


def _serve(adbc: Any, connection: Any, request: dict[str, Any], sink: pa.NativeFile) -> None:
    """Write the stream of one request: its count in the schema, then its rows."""
    with contextlib.ExitStack() as statements:

        def query(sql: str, batch_rows: int | None = None) -> pa.RecordBatchReader:
            statement = statements.enter_context(adbc.AdbcStatement(connection))
            if batch_rows is not None:
                statement.set_options(**{"adbc.sqlite.query.batch_rows": str(batch_rows)})
            statement.set_sql_query(sql)
            handle, _ = statement.execute_query()
            return statements.enter_context(pa.RecordBatchReader._import_from_c(handle.address))

        query(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}").read_all()
        rows = query(request["count_sql"]).read_all().column(0)[0].as_py()
        reader = query(request["sql"], int(request["rows"]))
        schema = reader.schema.with_metadata({_ROWS_KEY: str(int(rows)).encode()})
        try:
            with pa.ipc.new_stream(sink, schema) as writer:
                for batch in reader:
                    writer.write_batch(batch)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            raise SystemExit(1) from None  # the parent stopped reading


if __name__ == "__main__":
    main()
