"""Table definitions of the Parquet dataset for Athena and the Glue Data Catalog; pure.

Both are driven by the Arrow schemas of :mod:`recarchive.export.schema` (never a column list
kept by hand), so a column added to the dataset is in the DDL too. The partition column
``created_month`` (``YYYY-MM``, from the folder names) uses Athena's partition projection: no
crawler and no ``MSCK REPAIR TABLE``, a new month is queryable the moment its folder exists.

``athena`` gives ``CREATE EXTERNAL TABLE`` statements (Athena's SQL). ``glue`` gives the same
tables as the ``TableInput`` documents the Glue API takes (``aws glue create-table
--table-input``, boto3's ``create_table``, CloudFormation's and Terraform's Glue tables): Glue
itself runs no SQL, and a TableInput is what every one of those tools accepts as it is.
"""

from __future__ import annotations

import re
from typing import Any, Final

import pyarrow as pa

from recarchive.errors import UsageError
from recarchive.export.schema import TABLE_SCHEMAS

#: The partition column (hive partitioning: ``created_month=YYYY-MM`` folders).
PARTITION_COLUMN: Final = "created_month"
#: First month of the projected partition range, unless ``--first-month`` says otherwise.
DEFAULT_FIRST_MONTH: Final = "2020-01"

# Arrow types (by their string form) and their Hive/Athena names.
_SIMPLE_TYPES: Final[dict[str, str]] = {
    "string": "string",
    "large_string": "string",
    "bool": "boolean",
    "int8": "tinyint",
    "int16": "smallint",
    "int32": "int",
    "int64": "bigint",
    "float": "float",
    "double": "double",
    "date32[day]": "date",
    "binary": "binary",
}
_MONTH_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")

_PARQUET_FORMAT: Final = {
    "InputFormat": "org.apache.hadoop.hive.ql.io.parquet.MapredParquetInputFormat",
    "OutputFormat": "org.apache.hadoop.hive.ql.io.parquet.MapredParquetOutputFormat",
    "SerdeInfo": {
        "SerializationLibrary": "org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe",
        "Parameters": {"serialization.format": "1"},
    },
}


def hive_type(arrow_type: pa.DataType) -> str:
    """The Athena/Glue column type of an Arrow type.

    Raises:
        TypeError: A type the dataset does not use and this table does not map yet (a test
            checks every column of both schemas maps).
    """
    if pa.types.is_timestamp(arrow_type):
        # Athena reads Parquet timestamps adjusted to UTC as plain timestamps (UTC values).
        return "timestamp"
    if pa.types.is_decimal(arrow_type):
        return f"decimal({arrow_type.precision},{arrow_type.scale})"
    name = _SIMPLE_TYPES.get(str(arrow_type))
    if name is None:
        raise TypeError(f"no Athena type for the Arrow type {arrow_type}")
    return name


def table_columns(schema: pa.Schema) -> list[tuple[str, str]]:
    """``(name, Athena type)`` of every column of ``schema``, in order."""
    return [(field.name, hive_type(field.type)) for field in schema]


def table_location(location: str, table: str) -> str:
    """The S3 folder of ``table`` under the dataset's root ``location``."""
    return f"{location.rstrip('/')}/{table}/"


def dataset_location(location: str | None, parquet_root: str) -> str:
    """Where the dataset is on S3: ``location``, else the Parquet root when it is on S3.

    Raises:
        UsageError: Neither is an ``s3://`` URL (Athena reads only S3).
    """
    chosen = location if location is not None else parquet_root
    if not chosen.startswith("s3://") or len(chosen.rstrip("/")) <= len("s3://"):
        if location is None:
            raise UsageError(
                f"RECARCHIVE_PARQUET_ROOT ({parquet_root}) is not on S3: pass --location s3://..."
            )
        raise UsageError(f"--location must be an s3:// URL, not {location!r}")
    return chosen


def projection_properties(location: str, table: str, first_month: str) -> dict[str, str]:
    """The table properties of partition projection on ``created_month``.

    Raises:
        UsageError: ``first_month`` is not ``YYYY-MM``.
    """
    if not _MONTH_RE.match(first_month):
        raise UsageError(f"--first-month must be YYYY-MM, not {first_month!r}")
    column = PARTITION_COLUMN
    return {
        "projection.enabled": "true",
        f"projection.{column}.type": "date",
        f"projection.{column}.format": "yyyy-MM",
        f"projection.{column}.interval": "1",
        f"projection.{column}.interval.unit": "MONTHS",
        f"projection.{column}.range": f"{first_month},NOW",
        "storage.location.template": f"{table_location(location, table)}{column}=${{{column}}}/",
    }


def selected_tables(only: str | None) -> dict[str, pa.Schema]:
    """The schemas of both datasets, or of the one named ``only``.

    Raises:
        UsageError: ``only`` names no dataset.
    """
    if only is None:
        return dict(TABLE_SCHEMAS)
    if only not in TABLE_SCHEMAS:
        raise UsageError(f"--table must be one of {', '.join(TABLE_SCHEMAS)}, not {only!r}")
    return {only: TABLE_SCHEMAS[only]}


def _quoted(name: str) -> str:
    return f"`{name}`"


def athena_ddl(
    location: str,
    *,
    database: str | None = None,
    first_month: str = DEFAULT_FIRST_MONTH,
    only: str | None = None,
) -> str:
    """``CREATE EXTERNAL TABLE`` statements for both datasets (or ``only``), a blank line apart."""
    statements = []
    for table, schema in selected_tables(only).items():
        name = _quoted(table) if database is None else f"{_quoted(database)}.{_quoted(table)}"
        columns = ",\n".join(f"  {_quoted(col)} {kind}" for col, kind in table_columns(schema))
        properties = ",\n".join(
            f"  '{key}' = '{value}'"
            for key, value in projection_properties(location, table, first_month).items()
        )
        statements.append(
            f"CREATE EXTERNAL TABLE IF NOT EXISTS {name} (\n{columns}\n)\n"
            f"PARTITIONED BY ({_quoted(PARTITION_COLUMN)} string)\n"
            "STORED AS PARQUET\n"
            f"LOCATION '{table_location(location, table)}'\n"
            f"TBLPROPERTIES (\n{properties}\n);\n"
        )
    return "\n".join(statements)


def glue_table_inputs(
    location: str, *, first_month: str = DEFAULT_FIRST_MONTH, only: str | None = None
) -> dict[str, dict[str, Any]]:
    """Glue ``TableInput`` documents of both datasets (or ``only``), by table name."""
    return {
        table: {
            "Name": table,
            "TableType": "EXTERNAL_TABLE",
            "Parameters": {
                "EXTERNAL": "TRUE",
                "classification": "parquet",
                **projection_properties(location, table, first_month),
            },
            "PartitionKeys": [{"Name": PARTITION_COLUMN, "Type": "string"}],
            "StorageDescriptor": {
                "Columns": [{"Name": col, "Type": kind} for col, kind in table_columns(schema)],
                "Location": table_location(location, table),
                **_PARQUET_FORMAT,
            },
        }
        for table, schema in selected_tables(only).items()
    }
