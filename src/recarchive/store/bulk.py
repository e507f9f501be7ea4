"""Writing many rows at once, the same way on SQLite and PostgreSQL.

IDs travel in batches that keep statements below the backends' parameter limits, inserts of
many rows cost one round trip, transactions PostgreSQL aborted for a deadlock run again, and
error text is clipped to what the ledger and the runs table keep.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import BigInteger, Boolean, Connection, Float, Integer, String, Table, Text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError

from recarchive.store.tables import UTCDateTime

__all__ = [
    "BATCH",
    "MAX_ERROR_CHARS",
    "batches",
    "chunks",
    "clip_error",
    "dialect_insert",
    "executemany",
    "retry_conflicts",
]

#: IDs per statement: well below SQLite's bound-parameter limit and PostgreSQL's comfort zone.
BATCH = 500
#: Longest error text kept in the ledger and the runs table.
MAX_ERROR_CHARS = 2000
#: deadlock_detected, serialization_failure.
_RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})


def batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    """Consume ``items`` as a stream, ``size`` at a time (the last batch may be shorter).

    Args:
        items: IDs, read once.
        size: Most IDs per batch.

    Yields:
        Lists of at most ``size`` IDs, in the order given.
    """
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def chunks(items: Sequence[str], size: int = BATCH) -> Iterator[Sequence[str]]:
    """Slice ``items`` into pieces of at most ``size``, for ``IN (...)`` lists.

    Args:
        items: IDs.
        size: Most IDs per piece.

    Yields:
        Consecutive slices of ``items``.
    """
    for start in range(0, len(items), size):
        yield items[start : start + size]


def clip_error(message: str | None) -> str | None:
    """Cut an error text to :data:`MAX_ERROR_CHARS` (``None`` stays ``None``).

    Args:
        message: Error text or reason, as the caller wrote it.

    Returns:
        At most :data:`MAX_ERROR_CHARS` characters of it.
    """
    return None if message is None else message[:MAX_ERROR_CHARS]


def dialect_insert(connection: Connection, table: Table) -> Any:
    """A dialect INSERT that knows ``ON CONFLICT``.

    Args:
        connection: The connection whose dialect (SQLite or PostgreSQL) runs the statement.
        table: The table to insert into.

    Returns:
        The dialect's ``insert(table)``.
    """
    if connection.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def executemany(
    connection: Connection,
    statement: Any,
    table: Table,
    rows: list[dict[str, Any]],
) -> None:
    """Execute an INSERT for many row dicts (all with the same keys), fast on both backends.

    SQLite: the driver's ``executemany`` with values converted by the columns' own bind
    processors (SQLAlchemy's per-row parameter handling costs more than SQLite's insert).
    PostgreSQL: one ``INSERT ... SELECT * FROM unnest(array, ...)`` with one array per
    column: a single round trip and a short statement, where row-wise executemany costs a
    pipelined statement per row and multi-row VALUES a huge statement psycopg parses in
    Python. There, ``statement``'s own ``ON CONFLICT`` clause, compiled by SQLAlchemy, ends
    the statement: one definition of an upsert serves both backends.

    Args:
        connection: A connection inside a transaction.
        statement: An INSERT of ``table`` (from :func:`dialect_insert` for an upsert); its
            conflict clause may name columns and ``EXCLUDED`` values, but bind no values.
        table: The table ``statement`` inserts into.
        rows: Row dicts keyed by column name.
    """
    if not rows:
        return
    if connection.dialect.name == "postgresql":
        _unnest_insert(connection, statement, table, rows)
        return
    compiled = statement.compile(dialect=connection.dialect, column_keys=list(rows[0]))
    names = list(compiled.positiontup or ())
    # Column-wise: one list per column, converted with map() only where the column's type
    # needs it (timestamps); sqlite3 binds str, float, int, bool and None natively.
    columns: list[list[Any]] = []
    for name in names:
        values = [row[name] for row in rows]
        column_type = table.c[name].type
        if not isinstance(column_type, Boolean):
            process = column_type.bind_processor(connection.dialect)
            if process is not None:
                values = list(map(process, values))
        columns.append(values)
    connection.exec_driver_sql(str(compiled), list(zip(*columns, strict=True)))


_PG_ARRAY_TYPES: dict[type, str] = {
    Text: "text",
    String: "text",
    Float: "float8",
    Boolean: "bool",
    BigInteger: "int8",
    Integer: "int4",
    UTCDateTime: "timestamptz",
}


def _pg_array_type(column: Any) -> str:
    for kind, name in _PG_ARRAY_TYPES.items():
        if isinstance(column.type, kind):
            return name
    raise TypeError(f"no array type for column {column.name} ({column.type!r})")


def _unnest_insert(
    connection: Connection, statement: Any, table: Table, rows: list[dict[str, Any]]
) -> None:
    quote = connection.dialect.identifier_preparer.quote
    names = list(rows[0])
    target = ", ".join(quote(name) for name in names)
    arrays = ", ".join(
        f"%(p{index})b::{_pg_array_type(table.c[name])}[]" for index, name in enumerate(names)
    )
    sql = f"INSERT INTO {quote(table.name)} ({target}) SELECT * FROM unnest({arrays})"  # noqa: S608
    # The VALUES part of the compiled statement is replaced by the arrays; its ON CONFLICT
    # clause (column names and EXCLUDED references only, no bound values) is kept as it is.
    compiled = str(statement.compile(dialect=connection.dialect))
    conflict = compiled.find(" ON CONFLICT ")
    if conflict >= 0:
        sql += compiled[conflict:]
    # Identifiers come from our own tables; every value travels as a bound array.
    params = {f"p{index}": [row[name] for row in rows] for index, name in enumerate(names)}
    connection.exec_driver_sql(sql, params)


def retry_conflicts(work: Callable[[], None], attempts: int = 4) -> None:
    """Run a whole transaction again when PostgreSQL aborted it for a deadlock.

    The transactions retried here are idempotent (upserts), so a second attempt is safe.

    Args:
        work: Runs the transaction from its start (opens and commits it itself).
        attempts: Most runs of ``work`` in all.

    Raises:
        sqlalchemy.exc.OperationalError: Not a deadlock or serialization failure, or still
            one after ``attempts`` runs.
    """
    for attempt in range(1, attempts + 1):
        try:
            work()
            return
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) not in _RETRYABLE_SQLSTATES or (
                attempt == attempts
            ):
                raise
            time.sleep(0.05 * attempt)
