"""A Parquet partition file being written (zstd, fixed row groups, synced), and where it goes.

:mod:`recarchive.export.parquet` writes a partition's two files side by side with it, to temp
files it then puts in place.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from recarchive.errors import ConfigError
from recarchive.export.pii import METADATA_KEY

__all__ = ["ROW_GROUP_ROWS", "PartitionFile", "s3_filesystem", "sync_folder"]

#: Rows per Parquet row group. A row group waits whole in memory before it is written (about
#: 22 MB of Arrow data for ``recordings``, and the encoder's buffers again while it is written),
#: so this bounds the export's memory whatever a partition's size: at 128k rows the export of
#: 1M recordings peaked at 393 MB, at 32k at ~270 MB (docs/benchmarks.md). Row groups of ~2 MB
#: compressed are still whole reads for DuckDB and Athena, and give finer min/max skipping.
ROW_GROUP_ROWS = 32 * 1024


class PartitionFile:
    """One partition file being written, in row groups of exactly :data:`ROW_GROUP_ROWS` rows.

    The last row group may be smaller. The batches wait in memory until a row group is full, so
    one row group per file is the export's working set.
    """

    def __init__(self, path: Path, schema: pa.Schema, tag: str | None) -> None:
        self.path = path
        self.schema = schema
        self.rows = 0
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(path, schema, compression="zstd")
        if tag is not None:
            # File metadata, not the Arrow schema's: readers see the same schema in every mode.
            self._writer.add_key_value_metadata({METADATA_KEY: tag})

    def add(self, batch: pa.RecordBatch) -> None:
        """Take ``batch``; write the row groups it fills."""
        assert self._writer is not None
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        if self._pending_rows >= ROW_GROUP_ROWS:
            table = pa.Table.from_batches(self._pending, self.schema)
            full = self._pending_rows - self._pending_rows % ROW_GROUP_ROWS
            self._writer.write_table(table.slice(0, full), row_group_size=ROW_GROUP_ROWS)
            self.rows += full
            self._pending = table.slice(full).to_batches()
            self._pending_rows -= full

    def close(self) -> int:
        """Write what is pending, close the file and sync it to disk; return its rows."""
        assert self._writer is not None
        if self._pending_rows or self.rows == 0:
            self._writer.write_table(
                pa.Table.from_batches(self._pending, self.schema), row_group_size=ROW_GROUP_ROWS
            )
            self.rows += self._pending_rows
        self._pending = []
        self._writer.close()
        self._writer = None
        with self.path.open("rb") as handle:
            os.fsync(handle.fileno())
        return self.rows

    def abort(self) -> None:
        """Close the file if :meth:`close` did not (the caller removes it)."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            with contextlib.suppress(Exception):
                writer.close()


def sync_folder(folder: Path) -> None:
    """Sync ``folder`` itself to disk: a rename in it survives a crash (best effort)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def s3_filesystem(endpoint_url: str | None) -> pafs.S3FileSystem:
    """The S3 filesystem partition files of ``s3://`` roots go to (``endpoint_url``: S3-compatible).

    Raises:
        ConfigError: ``endpoint_url`` is not a URL.
    """
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
