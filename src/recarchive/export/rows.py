"""The rows of one partition, read from SQL in bulk, as Arrow record batches.

:mod:`recarchive.export.parquet` writes them. The rows come from the DB-API cursor in chunks
of :data:`FETCH_ROWS` and become Arrow arrays in C++ (one struct array per chunk, cast
column-wise), not through per-value Python conversions: that was most of the export's time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import Connection, Select, and_, select

from recarchive.export.schema import PARTIES_SCHEMA, RECORDINGS_SCHEMA, TIMESTAMP
from recarchive.model import PARTY_FIELDS, PARTY_ROLES, RECORDING_FIELDS, LedgerState
from recarchive.store.tables import archive_ledger, recording_parties, recordings

__all__ = ["FETCH_ROWS", "parties_query", "party_batches", "recording_batches", "recordings_query"]

#: Rows fetched from SQL per round trip. It also sets the page layout of the files (a chunk
#: of rows is written page by page), so the same rows give the same bytes only at the same
#: value: a change makes the next export rewrite every partition once.
FETCH_ROWS = 5000


def recordings_query(month: str) -> Select[Any]:
    """The ``recordings`` rows of ``month`` with their parties and ledger columns, by id."""
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


def parties_query(month: str) -> Select[Any]:
    """The ``recording_parties`` rows of ``month``'s recordings, by recording id and role."""
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


def recording_batches(connection: Connection, month: str) -> Iterator[pa.RecordBatch]:
    """Record batches of :data:`RECORDINGS_SCHEMA` for ``month``, in id order."""
    sqlite = connection.dialect.name == "sqlite"
    for rows in _raw_partitions(connection, recordings_query(month)):
        yield _with_media_columns(_batch(rows, _RECORDINGS_SQL_SCHEMA, sqlite))


def party_batches(connection: Connection, month: str) -> Iterator[pa.RecordBatch]:
    """Record batches of :data:`PARTIES_SCHEMA` for ``month``, by recording id and role."""
    sqlite = connection.dialect.name == "sqlite"
    for rows in _raw_partitions(connection, parties_query(month)):
        yield _batch(rows, PARTIES_SCHEMA, sqlite)


#: The columns of :func:`_recordings_query` as they come from SQL: the recordings columns up to
#: the party columns, then the ledger's, which :func:`_with_media_columns` turns into the
#: media columns of :data:`RECORDINGS_SCHEMA`.
_RECORDINGS_SQL_SCHEMA = pa.schema(
    [
        *list(RECORDINGS_SCHEMA)[: RECORDINGS_SCHEMA.get_field_index("media_s3_uri")],
        pa.field("s3_bucket", pa.string()),
        pa.field("s3_key", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("size_bytes", pa.int64()),
        pa.field("archived_at", TIMESTAMP),
        pa.field("state", pa.string()),
    ]
)


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
    arrays = [
        values
        if values.type == item.type
        else values.cast(pa.timestamp("us")).cast(item.type)
        if item.type == TIMESTAMP
        else values.cast(item.type)
        for values, item in zip(fields, schema, strict=True)
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _with_media_columns(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Turn the ledger columns into the media columns: set only for ``archived`` rows."""
    bucket, key, sha256, size, archived_at, state = batch.columns[-6:]
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
        *batch.columns[:-6],
        pc.if_else(located, uri, pa.scalar(None, pa.string())),
        *(
            pc.if_else(archived, values, pa.scalar(None, values.type))
            for values in (sha256, size, archived_at)
        ),
        state,
    ]
    return pa.RecordBatch.from_arrays(columns, schema=RECORDINGS_SCHEMA)
