"""Writing many rows at once, the same way on SQLite and PostgreSQL.

IDs travel in batches that keep statements below the backends' parameter limits, inserts of
many rows cost one round trip, transactions PostgreSQL aborted for a deadlock run again, and
error text is clipped to what the ledger and the runs table keep.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from operator import itemgetter
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Connection,
    Float,
    Integer,
    String,
    Table,
    Text,
    any_,
    bindparam,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import OperationalError

from recarchive.store.tables import UTCDateTime

__all__ = [
    "BATCH",
    "MAX_ERROR_CHARS",
    "among_ids",
    "batches",
    "chunks",
    "clip_error",
    "dialect_insert",
    "executemany",
    "executemany_bound",
    "insert_for",
    "insert_returning",
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
    return insert_for(connection.dialect.name, table)


def insert_for(dialect_name: str, table: Table) -> Any:
    """:func:`dialect_insert` by dialect name, for statements built once at import.

    Args:
        dialect_name: ``"postgresql"`` or ``"sqlite"``.
        table: The table to insert into.

    Returns:
        The dialect's ``insert(table)``.
    """
    if dialect_name == "postgresql":
        # Imported here: PostgreSQL's dialect costs a SQLite process ~30 ms to load.
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table)
    return sqlite.insert(table)


def among_ids(dialect_name: str, column: Any) -> Any:
    """``column IN (:ids)`` as a statement built once, for an ``ids`` list bound per call.

    SQLite: an expanding parameter. PostgreSQL: ``= ANY(:ids)`` with one array, where an
    expanded list costs a typed placeholder per ID that SQLAlchemy renders and psycopg
    parses again for every batch.

    Args:
        dialect_name: ``"postgresql"`` or ``"sqlite"``.
        column: The column compared (its type types the array).

    Returns:
        The condition; execute its statement with ``{"ids": [...]}``.
    """
    if dialect_name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return column == any_(bindparam("ids", type_=postgresql.ARRAY(column.type)))
    return column.in_(bindparam("ids", expanding=True))


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
    the statement: one definition of an upsert serves both backends. The SQL text is compiled
    once per statement object and set of columns (pass the same statement object again to
    reuse it).

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
        _unnest_insert(connection, statement, table, rows, None)
        return
    names = list(rows[0])
    sql, order = _compiled(connection, statement, names)
    # Timestamps are formatted once per distinct instant across the batch's columns: rows
    # share the fetch or registration time, and createdAt often equals updatedAt.
    formatted: dict[Any, Any] = {}
    columns = [
        _sqlite_values(connection, table.c[name].type, name, rows, formatted) for name in order
    ]
    connection.exec_driver_sql(sql, list(zip(*columns, strict=True)))


def executemany_bound(connection: Connection, statement: Any, rows: list[dict[str, Any]]) -> int:
    """SQLite: ``statement`` once per row through the driver's ``executemany``; rows changed.

    For a statement whose per-row values are bind parameters (``bindparam(name, type_=...)``)
    named by the rows' keys (all rows with the same keys); its other parameters are constants
    of the statement itself. Each value is converted by its parameter's own type, timestamps
    once per instant, as :func:`executemany` does: SQLAlchemy's per-row parameter handling
    cost more than SQLite's update. Compiled once per statement object: build it once.

    Args:
        connection: A SQLite connection inside a transaction.
        statement: An INSERT, UPDATE or DELETE built once (e.g. under ``functools.cache``).
        rows: Each row's values by parameter name.

    Returns:
        The rows the statement changed, over all of ``rows``.

    Raises:
        ValueError: ``rows`` give no value for a parameter the statement has none for.
    """
    if not rows:
        return 0
    key = (statement, connection.dialect.name, tuple(rows[0]), "bound")
    found = _BOUND.get(key)
    if found is None:
        compiled = statement.compile(dialect=connection.dialect)
        order = tuple(compiled.positiontup or ())
        if missing := [n for n in order if compiled.binds[n].required and n not in rows[0]]:
            raise ValueError(f"the rows give no value for bind parameters {missing}")
        found = (
            str(compiled),
            [
                (name, compiled.binds[name].type, compiled.binds[name].effective_value)
                for name in order
            ],
        )
        _remember(key, found, _BOUND)
    sql, binds = found
    formatted: dict[Any, Any] = {}
    columns: list[Iterable[Any]] = []
    for name, kind, constant in binds:
        if name in rows[0]:
            columns.append(_sqlite_values(connection, kind, name, rows, formatted))
        else:  # the statement's own value, the same on every row
            process = kind.bind_processor(connection.dialect)
            value = process(constant) if process is not None else constant
            columns.append(itertools.repeat(value, len(rows)))
    return int(connection.exec_driver_sql(sql, list(zip(*columns, strict=True))).rowcount)


def insert_returning(
    connection: Connection,
    statement: Any,
    table: Table,
    rows: list[dict[str, Any]],
    returning: str,
) -> list[Any]:
    """PostgreSQL only: :func:`executemany`, returning a column of every row it wrote.

    Rows it inserted or updated come back; rows an upsert's ``WHERE`` left alone do not.

    Args:
        connection: A PostgreSQL connection inside a transaction.
        statement: As for :func:`executemany`.
        table: The table ``statement`` inserts into.
        rows: Row dicts keyed by column name.
        returning: The column whose values come back.

    Returns:
        The ``returning`` values of the rows written, in no particular order.
    """
    if not rows:
        return []
    if connection.dialect.name != "postgresql":
        raise ValueError("insert_returning is for PostgreSQL (SQLite: executemany)")
    return _unnest_insert(connection, statement, table, rows, returning)


#: Compiled SQL text by (statement, dialect, columns): statements built once by their module
#: compile once, not once per batch (compiling a 22-column upsert costs a few milliseconds).
_COMPILED: dict[tuple[Any, str, tuple[str, ...], str | None], tuple[str, tuple[str, ...]]] = {}
#: Bound on :data:`_COMPILED`: callers that build a new statement per call only refill it.
_COMPILED_MAX = 64


def _compiled(
    connection: Connection, statement: Any, names: list[str]
) -> tuple[str, tuple[str, ...]]:
    """SQLite: the statement's SQL text and the column order of its ``?`` parameters."""
    key = (statement, connection.dialect.name, tuple(names), None)
    found = _COMPILED.get(key)
    if found is None:
        compiled = statement.compile(dialect=connection.dialect, column_keys=names)
        found = (str(compiled), tuple(compiled.positiontup or ()))
        _remember(key, found)
    return found


def _remember(key: Any, value: Any, cache: dict[Any, Any] | None = None) -> None:
    """Keep ``value`` in ``cache`` (:data:`_COMPILED` by default), emptied when it is full."""
    cache = _COMPILED if cache is None else cache
    if len(cache) >= _COMPILED_MAX:
        cache.clear()
    cache[key] = value


def _sqlite_values(
    connection: Connection,
    column_type: Any,
    name: str,
    rows: list[dict[str, Any]],
    formatted: dict[Any, Any],
) -> list[Any]:
    """One column's values for sqlite3, converted where the column's type needs it.

    sqlite3 binds str, float, int, bool and None natively; timestamps are formatted by the
    column's own processor, once per distinct value (``formatted`` remembers them).
    """
    values = list(map(itemgetter(name), rows))
    if isinstance(column_type, Boolean):
        return values
    process = column_type.bind_processor(connection.dialect)
    if process is None:
        return values
    if not isinstance(column_type, UTCDateTime):
        return list(map(process, values))
    # Equal datetimes are equal instants, and the processor's text depends on the instant
    # only (every UTCDateTime column has the same processor).
    out = []
    for value in values:
        text = formatted.get(value, _UNSEEN)
        if text is _UNSEEN:
            text = formatted[value] = process(value)
        out.append(text)
    return out


_UNSEEN = object()
#: :func:`executemany_bound`'s statements: SQL text, and each parameter's name, type, constant.
_BOUND: dict[tuple[Any, str, tuple[str, ...], str], tuple[str, list[tuple[str, Any, Any]]]] = {}


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


def _unnest_sql(
    connection: Connection,
    statement: Any,
    table: Table,
    names: list[str],
    returning: str | None,
) -> str:
    """PostgreSQL: ``statement`` as an INSERT from bound arrays (compiled once, cached)."""
    key = (statement, connection.dialect.name, tuple(names), returning)
    found = _COMPILED.get(key)
    if found is not None:
        return found[0]
    quote = connection.dialect.identifier_preparer.quote
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
    if returning is not None:
        sql += f" RETURNING {quote(table.c[returning].name)}"
    _remember(key, (sql, ()))
    return sql


def _unnest_insert(
    connection: Connection,
    statement: Any,
    table: Table,
    rows: list[dict[str, Any]],
    returning: str | None,
) -> list[Any]:
    """PostgreSQL: one ``INSERT ... SELECT * FROM unnest(...)``, one bound array per column.

    One round trip per batch. ``COPY`` into a session's stage table, then an INSERT from
    it, was measured too (issue 13): the same client CPU per row (psycopg's ``write_row``
    per row against its array dumping per element) and three round trips instead of one,
    so slower in wall time on a loaded machine.
    """
    names = list(rows[0])
    sql = _unnest_sql(connection, statement, table, names, returning)
    # Identifiers come from our own tables; every value travels as a bound array.
    params = {f"p{index}": list(map(itemgetter(name), rows)) for index, name in enumerate(names)}
    result = connection.exec_driver_sql(sql, params)
    return list(result.scalars()) if returning is not None else []


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
