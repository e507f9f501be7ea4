"""The rows of one partition, read from SQL in bulk, as Arrow record batches.

:mod:`recarchive.export.parquet` writes them. One query per partition gives both files' rows:
each recording with its parties as columns (``recordings``), from which the ``recording_parties``
rows are taken apart in Arrow, so the parties are read once, not by a second query (that one
cost a third of the export's time), and the two files of a partition show one snapshot. The
rows come from the DB-API cursor in chunks of :data:`FETCH_ROWS` and become Arrow arrays in C++
(one struct array per chunk, cast column-wise), not through per-value Python conversions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Generator, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import Boolean, Connection, Integer, Select, and_, case, func, select
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from recarchive.export import sqlite_stream
from recarchive.export.schema import PARTIES_SCHEMA, RECORDINGS_SCHEMA, TIMESTAMP
from recarchive.model import PARTY_FIELDS, PARTY_ROLES, RECORDING_FIELDS, LedgerState
from recarchive.store.bulk import chunks
from recarchive.store.engine import read_only_sqlite_uri
from recarchive.store.tables import archive_ledger, recording_parties, recordings

__all__ = [
    "CHILD_PARTITION_ROWS",
    "CHILD_READER_ROWS",
    "FETCH_ROWS",
    "child_reader",
    "parties_query",
    "partition_batches",
    "recordings_query",
]

#: Rows fetched from SQL per round trip. It also sets the page layout of the files (a chunk
#: of rows is written page by page), so the same rows give the same bytes only at the same
#: value: a change makes the next export rewrite every partition once.
FETCH_ROWS = 5000
#: Recordings of an export's due partitions, together, from which a child reader is started
#: (SQLite): the child costs ~0.45 s of CPU to start (Python, pyarrow; once per export), then
#: reads ~13 µs per recording where the driver's path costs ~33 µs (docs/benchmarks.md).
CHILD_READER_ROWS = 20_000
#: Recordings of a partition from which the child, once there is one, reads it: below, one
#: more request (a count, a query, a stream) costs about what the driver's path saves.
CHILD_PARTITION_ROWS = 1_000


class _Integral(FunctionElement[Any]):
    """An INTEGER or BOOLEAN column's value, refused on SQLite when it is not one.

    SQLite keeps a REAL such as 1.5 written by hand into an INTEGER column as it is, and
    pyarrow's conversion of a Python float to an integer type drops the fraction without an
    error: the file would show 1 where SQL holds 1.5. A BOOLEAN column (no CHECK constraint)
    takes any number: 0.5 became ``False``, 2 ``True``, and 300 failed one read path but not
    the other. So a value that is not an integer (for a boolean: not 0 or 1) comes out as
    text here, which no integer conversion takes, and the partition fails with a clear error
    instead. PostgreSQL's column types allow no such value.
    """

    inherit_cache = True
    name = "integral"

    def __init__(self, column: Any) -> None:
        super().__init__(column)
        self.type = column.type


@compiles(_Integral)
def _integral_default(element: _Integral, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.clauses, **kw)


@compiles(_Integral, "sqlite")
def _integral_sqlite(element: _Integral, compiler: SQLCompiler, **kw: Any) -> str:
    value = compiler.process(element.clauses, **kw)
    if isinstance(element.type, Boolean):
        return (
            f"CASE WHEN {value} IS NULL OR (typeof({value}) = 'integer' AND {value} IN (0, 1))"
            f" THEN {value} ELSE 'not a boolean' END"
        )
    return (
        f"CASE WHEN typeof({value}) IN ('integer', 'null') THEN {value} ELSE 'not an integer' END"
    )


def _exact(column: Any, name: str | None = None) -> Any:
    """``column`` (labelled ``name``), through :class:`_Integral` where it holds integers."""
    value = _Integral(column) if isinstance(column.type, Integer | Boolean) else column
    return value.label(name or column.name)


def _archived_size() -> Any:
    """The ledger's ``size_bytes`` of an ``archived`` row, else NULL.

    The export shows it only for those (:func:`_with_media_columns`): a value a failed or
    pending row holds must not fail its partition through :class:`_Integral`.
    """
    size = archive_ledger.c.size_bytes
    archived = archive_ledger.c.state == LedgerState.ARCHIVED.value
    return case((archived, _Integral(size)), else_=None).label(size.name)


def recordings_query(month: str) -> Select[Any]:
    """The ``recordings`` rows of ``month`` with their parties and ledger columns, by id.

    Each role's party comes as its fields and a ``{role}_role`` column: the role where the
    recording has that party's row, NULL where it has none (its fields may all be NULL too).
    """
    parties = {role: recording_parties.alias(role) for role in PARTY_ROLES}
    joined: Any = recordings
    for role, alias in parties.items():
        joined = joined.outerjoin(
            alias, and_(alias.c.recording_id == recordings.c.id, alias.c.role == role)
        )
    joined = joined.outerjoin(archive_ledger, archive_ledger.c.recording_id == recordings.c.id)
    columns: list[Any] = [_exact(recordings.c[name]) for name in (*RECORDING_FIELDS, "fetched_at")]
    columns += [
        _exact(parties[role].c[name], f"{role}_{name}")
        for role in PARTY_ROLES
        for name in PARTY_FIELDS
    ]
    columns += [
        archive_ledger.c.s3_bucket,
        archive_ledger.c.s3_key,
        archive_ledger.c.sha256,
        _archived_size(),
        archive_ledger.c.archived_at,
        archive_ledger.c.state,
    ]
    columns += [parties[role].c.role.label(f"{role}_role") for role in PARTY_ROLES]
    return (
        select(*columns)
        .select_from(joined)
        .where(recordings.c.created_month == month)
        .order_by(recordings.c.id)
    )


def parties_query(month: str) -> Select[Any]:
    """The ``recording_parties`` rows of ``month``'s recordings, by recording id and role.

    What a partition's ``recording_parties`` file holds; the export takes those rows from
    :func:`recordings_query`'s instead (:func:`partition_batches`), the tests compare with this.
    """
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

    Plain tuples of the driver's values: ``exec_driver_sql`` skips SQLAlchemy's per-value
    result processing (it dominated the export's time), and timestamps and booleans are
    converted column-wise by Arrow in :func:`_batch`.
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
    for rows in result.partitions(FETCH_ROWS):
        # Arrow takes tuples, not Rows; through SQLAlchemy's result, not the DB-API cursor,
        # because a server-side cursor's result has buffered the first row already.
        yield [tuple(row) for row in rows]


def child_reader(connection: Connection, months: Collection[str]) -> sqlite_stream.Reader | None:
    """The child reader for an export of ``months``, or ``None`` where it is not used.

    One on a SQLite file with the ADBC driver installed, when ``months`` hold at least
    :data:`CHILD_READER_ROWS` recordings together; its child starts at the first partition
    it reads (:func:`partition_batches`) and serves the export's later ones.
    """
    if connection.dialect.name != "sqlite" or not sqlite_stream.available():
        return None
    uri = read_only_sqlite_uri(connection.engine.url.database or "")
    if uri is None:
        return None
    total = 0
    for chunk in chunks(sorted(months)):
        total += connection.execute(
            select(func.count())
            .select_from(recordings)
            .where(recordings.c.created_month.in_(chunk))
        ).scalar_one()
    return sqlite_stream.Reader(uri) if total >= CHILD_READER_ROWS else None


def partition_batches(
    connection: Connection, month: str, reader: sqlite_stream.Reader | None = None
) -> Generator[tuple[pa.RecordBatch, pa.RecordBatch], None, None]:
    """Record batches of ``month``'s two files, in pairs, from one query.

    Each pair: ``recordings`` rows (:data:`RECORDINGS_SCHEMA`, in id order) and the same
    recordings' ``recording_parties`` rows (:data:`PARTIES_SCHEMA`, by recording id and role).

    With a ``reader`` (:func:`child_reader`) that has not stalled, a partition of at least
    :data:`CHILD_PARTITION_ROWS` recordings is read by its child process
    (:mod:`recarchive.export.sqlite_stream`) in a transaction of its own, not
    ``connection``'s; otherwise through ``connection``'s driver.

    Raises:
        StreamFailed: The child's rows could not be read or did not check out: the batches
            yielded so far must be thrown away (read again without a ``reader``).
    """
    if (
        reader is not None
        and not reader.retired
        and connection.execute(_count_query(month)).scalar_one() >= CHILD_PARTITION_ROWS
    ):
        for batch in _streamed(reader, month):
            yield _with_media_columns(batch), _parties_of(batch)
        return
    sqlite = connection.dialect.name == "sqlite"
    for rows in _raw_partitions(connection, recordings_query(month)):
        batch = _batch(rows, _RECORDINGS_SQL_SCHEMA, sqlite)
        yield _with_media_columns(batch), _parties_of(batch)


def _count_query(month: str) -> Select[Any]:
    """The number of rows :func:`recordings_query` gives: one per recording of ``month``."""
    return select(func.count()).select_from(recordings).where(recordings.c.created_month == month)


def _streamed(reader: sqlite_stream.Reader, month: str) -> Iterator[pa.RecordBatch]:
    """``month``'s rows of :data:`_RECORDINGS_SQL_SCHEMA`, read by the child reader."""
    # Values rendered into the SQL text (the roles and the month, quoted by SQLAlchemy).
    literal = {"literal_binds": True}
    sql = str(recordings_query(month).compile(dialect=_SQLITE, compile_kwargs=literal))
    count_sql = _count_query(month).compile(dialect=_SQLITE, compile_kwargs=literal)
    sql = sqlite_stream.sentinel_sql(sql, _RECORDINGS_SQL_SCHEMA)
    # Closed here, not when collected: where a batch fails below (a value that does not
    # cast) or the export stops, the child is killed and its thread stopped at once.
    with contextlib.closing(reader.stream(sql, str(count_sql), batch_rows=FETCH_ROWS)) as rows:
        for batch in _rebatched(rows, FETCH_ROWS):
            try:
                columns = _cast(batch.columns, _RECORDINGS_SQL_SCHEMA)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                # The driver's path reads its own way (a REAL in an INTEGER column, say):
                # the partition is read there, which writes it or says why it cannot.
                raise sqlite_stream.StreamFailed(
                    f"a value of the child's rows does not convert ({type(exc).__name__})"
                ) from exc
            yield pa.RecordBatch.from_arrays(columns, schema=_RECORDINGS_SQL_SCHEMA)


def _rebatched(batches: Iterator[pa.RecordBatch], size: int) -> Iterator[pa.RecordBatch]:
    """``batches`` cut again into batches of exactly ``size`` rows (the last one smaller).

    The child's first batch lacks its sentinel row; batches of the driver path's size keep the
    files byte for byte the same whichever path read them (the parties files' pages differ
    otherwise).
    """
    pending: list[pa.RecordBatch] = []
    rows = 0
    for batch in batches:
        pending.append(batch)
        rows += batch.num_rows
        while rows >= size:
            table = pa.Table.from_batches(pending).combine_chunks()
            yield table.slice(0, size).to_batches()[0]
            rest = table.slice(size)
            pending, rows = ([*rest.to_batches()] if rest.num_rows else []), rest.num_rows
    if rows:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


#: The columns of :func:`recordings_query` as they come from SQL: the recordings columns up to
#: the party columns, then the ledger's, which :func:`_with_media_columns` turns into the
#: media columns of :data:`RECORDINGS_SCHEMA`, then each role's marker (:func:`_parties_of`).
_RECORDINGS_SQL_SCHEMA = pa.schema(
    [
        *list(RECORDINGS_SCHEMA)[: RECORDINGS_SCHEMA.get_field_index("media_s3_uri")],
        pa.field("s3_bucket", pa.string()),
        pa.field("s3_key", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("size_bytes", pa.int64()),
        pa.field("archived_at", TIMESTAMP),
        pa.field("state", pa.string()),
        *(pa.field(f"{role}_role", pa.string()) for role in PARTY_ROLES),
    ]
)
_SQLITE = sqlite_dialect.dialect(paramstyle="qmark")
#: Columns after the ledger's in :data:`_RECORDINGS_SQL_SCHEMA`: the roles' markers.
_MARKERS = len(PARTY_ROLES)
# The parties file is sorted by role within a recording, as parties_query's ORDER BY sorts:
# _parties_of puts them in PARTY_ROLES's order.
assert list(PARTY_ROLES) == sorted(PARTY_ROLES)


def _driver_type(kind: pa.DataType, sqlite: bool) -> pa.DataType:
    """The Arrow type the driver's values convert to directly (then cast to ``kind``)."""
    if sqlite and kind == TIMESTAMP:
        # SQLite holds naive UTC text ('YYYY-MM-DD HH:MM:SS.ffffff'): parsed by Arrow's cast.
        return pa.string()
    if sqlite and kind == pa.bool_():
        return pa.int8()  # 0 and 1
    return kind


def _batch(rows: Sequence[Any], schema: pa.Schema, sqlite: bool) -> pa.RecordBatch:
    """One record batch of ``schema`` from the driver's row tuples, converted in Arrow.

    The tuples go to Arrow as one struct array (converted row by row in C++, no per-column
    Python lists), whose fields are then cast column-wise where the driver's type differs.
    """
    driver = pa.struct([pa.field(item.name, _driver_type(item.type, sqlite)) for item in schema])
    fields = pa.array(rows, type=driver, from_pandas=False).flatten()
    return pa.RecordBatch.from_arrays(_cast(fields, schema), schema=schema)


def _cast(arrays: Sequence[pa.Array], schema: pa.Schema) -> list[pa.Array]:
    """``arrays`` cast column-wise to ``schema``'s types where the driver's type differs."""
    return [
        values
        if values.type == item.type
        else values.cast(pa.timestamp("us")).cast(item.type)
        if item.type == TIMESTAMP
        else values.cast(item.type)
        for values, item in zip(arrays, schema, strict=True)
    ]


def _with_media_columns(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Turn the ledger columns into the media columns: set only for ``archived`` rows."""
    ledger = batch.columns[: len(batch.columns) - _MARKERS]
    bucket, key, sha256, size, archived_at, state = ledger[-6:]
    archived = pc.fill_null(pc.equal(state, LedgerState.ARCHIVED.value), False)
    located = pc.and_(
        archived,
        pc.fill_null(
            pc.and_(pc.greater(pc.utf8_length(bucket), 0), pc.greater(pc.utf8_length(key), 0)),
            False,
        ),
    )
    uri = pc.binary_join_element_wise("s3://", bucket, "/", key, "")
    columns = [
        *ledger[:-6],
        pc.if_else(located, uri, pa.scalar(None, pa.string())),
        *(
            pc.if_else(archived, values, pa.scalar(None, values.type))
            for values in (sha256, size, archived_at)
        ),
        state,
    ]
    return pa.RecordBatch.from_arrays(columns, schema=RECORDINGS_SCHEMA)


def _parties_of(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The ``recording_parties`` rows of ``batch``'s recordings, by recording and role.

    Each role's party columns, on the rows where that role's marker says the party row exists.
    Only the roles of :data:`~recarchive.model.PARTY_ROLES`, the only ones the pipeline writes
    (:mod:`recarchive.normalize`): a row of another role, written into SQL by hand, is not in
    the file (nor in the ``recordings`` file's columns).
    """
    recordings = batch.num_rows
    roles = [batch.column(f"{role}_role") for role in PARTY_ROLES]
    # Row i of role r is row r * recordings + i of the roles' columns end to end; taken in the
    # order (recording, role), keeping the rows that exist.
    order = np.arange(len(roles) * recordings).reshape(len(roles), recordings).T.ravel()
    exists = np.concatenate([role.is_valid().to_numpy(zero_copy_only=False) for role in roles])
    taken = pa.array(order[exists[order]], type=pa.int64())
    ids = batch.column("id")
    columns = [
        pa.concat_arrays([ids] * len(roles)).take(taken),
        pa.concat_arrays(roles).take(taken),
    ]
    columns += [
        pa.concat_arrays([batch.column(f"{role}_{name}") for role in PARTY_ROLES]).take(taken)
        for name in PARTY_FIELDS
    ]
    return pa.RecordBatch.from_arrays(columns, schema=PARTIES_SCHEMA)
