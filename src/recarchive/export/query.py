"""``recarchive query``: DuckDB over the Parquet dataset, with views per table.

An in-memory DuckDB connection gets the views ``recordings`` and ``recording_parties`` over
``{root}/<table>/*/*.parquet`` (hive partitioning adds ``created_month``). A table with no
files yet still gets its view, empty but with every column, so queries written for the full
dataset work from the first day.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import duckdb
import pyarrow as pa

from recarchive.errors import ConfigError, InputError
from recarchive.export.schema import TABLE_SCHEMAS


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _configure_s3(connection: duckdb.DuckDBPyConnection, endpoint_url: str | None) -> None:
    try:
        connection.execute("INSTALL httpfs")
        connection.execute("LOAD httpfs")
    except duckdb.Error as exc:
        raise ConfigError(
            "querying an s3:// dataset needs DuckDB's httpfs extension, which could not be "
            "installed or loaded (offline?); query a local copy of the dataset instead"
        ) from exc
    options = ["TYPE S3"]
    key_id = os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key_id and secret:
        options += [f"KEY_ID {_quote(key_id)}", f"SECRET {_quote(secret)}"]
        if token := os.environ.get("AWS_SESSION_TOKEN"):
            options.append(f"SESSION_TOKEN {_quote(token)}")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options.append(f"REGION {_quote(region)}")
    if endpoint_url:
        parts = urlsplit(endpoint_url)
        options += [
            f"ENDPOINT {_quote(parts.netloc)}",
            "URL_STYLE 'path'",
            f"USE_SSL {'true' if parts.scheme == 'https' else 'false'}",
        ]
    try:
        connection.execute(f"CREATE SECRET recarchive_s3 ({', '.join(options)})")
    except duckdb.Error as exc:
        # Not chained: the message would quote the statement, which holds the secret key.
        raise ConfigError(
            f"could not configure DuckDB's S3 access ({type(exc).__name__})"
        ) from None


def _has_files(connection: duckdb.DuckDBPyConnection, pattern: str, remote: bool) -> bool:
    if not remote:
        table_dir = Path(pattern).parent.parent
        return any(table_dir.glob("*/*.parquet"))
    try:
        found = connection.execute("SELECT count(*) FROM glob(?)", [pattern]).fetchone()
    except duckdb.Error:
        return False
    return bool(found and found[0])


def open_dataset(root: str, *, s3_endpoint_url: str | None = None) -> duckdb.DuckDBPyConnection:
    """Open an in-memory DuckDB connection with the dataset's views.

    Args:
        root: Dataset root: local folder or ``s3://bucket/prefix``.
        s3_endpoint_url: S3-compatible endpoint for ``s3://`` roots.

    Returns:
        The connection; the caller closes it.

    Raises:
        ConfigError: An ``s3://`` root cannot be reached through httpfs.
    """
    connection = duckdb.connect(":memory:")
    try:
        remote = root.startswith("s3://")
        if remote:
            _configure_s3(connection, s3_endpoint_url)
        base = root.rstrip("/") if remote else str(Path(root))
        for table, schema in TABLE_SCHEMAS.items():
            pattern = f"{base}/{table}/*/*.parquet"
            if _has_files(connection, pattern, remote):
                # Table names are our constants; the path is quoted by _quote.
                connection.execute(
                    f"CREATE VIEW {table} AS SELECT * FROM read_parquet("  # noqa: S608
                    f"{_quote(pattern)}, hive_partitioning = true, union_by_name = true)"
                )
            else:
                empty = pa.Table.from_batches([], schema=schema).append_column(
                    "created_month", pa.array([], type=pa.string())
                )
                connection.register(f"_empty_{table}", empty)
                connection.execute(
                    f"CREATE VIEW {table} AS SELECT * FROM _empty_{table}"  # noqa: S608
                )
    except BaseException:
        connection.close()
        raise
    return connection


def run_query(
    root: str, sql: str, *, s3_endpoint_url: str | None = None
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run one SQL query over the dataset.

    Args:
        root: Dataset root (``RECARCHIVE_PARQUET_ROOT``).
        sql: DuckDB SQL using the views ``recordings`` and ``recording_parties``.
        s3_endpoint_url: S3-compatible endpoint for ``s3://`` roots.

    Returns:
        Column names and rows.

    Raises:
        InputError: The SQL is invalid or fails; the problem line carries DuckDB's message.
        ConfigError: An ``s3://`` root cannot be reached.
    """
    connection = open_dataset(root, s3_endpoint_url=s3_endpoint_url)
    try:
        result = connection.execute(sql)
        if result.description is None:
            return [], []
        columns = [item[0] for item in result.description]
        return columns, [tuple(row) for row in result.fetchall()]
    except duckdb.Error as exc:
        message = [line for line in str(exc).strip().splitlines() if line.strip()]
        raise InputError("query failed", problems=message or [type(exc).__name__]) from exc
    finally:
        connection.close()
