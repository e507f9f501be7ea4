"""The Parquet dataset's layout and Arrow schemas.

Layout (README, "Where things go"; columns: docs/dataset.md)::

    {root}/recordings/created_month=YYYY-MM/part-0.parquet
    {root}/recording_parties/created_month=YYYY-MM/part-0.parquet

Written by :mod:`recarchive.export.parquet`, read by :mod:`recarchive.export.query`.
"""

from __future__ import annotations

import pyarrow as pa

from recarchive.model import PARTY_FIELDS, PARTY_ROLES, RECORDING_FIELDS

__all__ = ["FILE_NAME", "PARTIES_SCHEMA", "RECORDINGS_SCHEMA", "TABLE_SCHEMAS", "TIMESTAMP"]

#: The one file of a partition folder.
FILE_NAME = "part-0.parquet"
#: Every timestamp column: microseconds, UTC.
TIMESTAMP = pa.timestamp("us", tz="UTC")

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
    "created_at": TIMESTAMP,
    "updated_at": TIMESTAMP,
    "ended_at": TIMESTAMP,
    "started_at": TIMESTAMP,
}
_PARTY_TYPES: dict[str, pa.DataType] = {
    name: pa.bool_() if name == "number_anonymous" else pa.string() for name in PARTY_FIELDS
}

#: Schema of ``recordings`` files: flattened parties, media and ledger columns. The partition
#: column ``created_month`` comes from the folder name (hive partitioning), not the file.
RECORDINGS_SCHEMA = pa.schema(
    [pa.field(name, _RECORDING_TYPES[name]) for name in RECORDING_FIELDS]
    + [pa.field("fetched_at", TIMESTAMP)]
    + [
        pa.field(f"{role}_{name}", _PARTY_TYPES[name])
        for role in PARTY_ROLES
        for name in PARTY_FIELDS
    ]
    + [
        pa.field("media_s3_uri", pa.string()),
        pa.field("media_sha256", pa.string()),
        pa.field("media_size_bytes", pa.int64()),
        pa.field("archived_at", TIMESTAMP),
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
