"""``recarchive ddl athena|glue``: the dataset's table definitions for analysts on AWS."""

from __future__ import annotations

import json
import re
import sys
from enum import StrEnum
from typing import Annotated

import typer

from recarchive.cli.output import handle_errors
from recarchive.config import load_settings
from recarchive.errors import InputError


class Dialect(StrEnum):
    """What ``ddl`` prints."""

    ATHENA = "athena"
    GLUE = "glue"


@handle_errors
def ddl(
    dialect: Annotated[
        Dialect, typer.Argument(help="athena: CREATE EXTERNAL TABLE; glue: TableInput JSON.")
    ],
    location: Annotated[
        str | None,
        typer.Option(help="The dataset's root on S3 (default: RECARCHIVE_PARQUET_ROOT if s3://)."),
    ] = None,
    database: Annotated[
        str | None, typer.Option(help="Athena database to qualify the tables with.")
    ] = None,
    table: Annotated[
        str | None,
        typer.Option(help="Only this table: recordings or recording_parties."),
    ] = None,
    first_month: Annotated[
        str | None,
        typer.Option(help="First month (YYYY-MM) of the projected partitions [default: 2020-01]."),
    ] = None,
) -> None:
    """Print the Athena DDL (or Glue TableInputs) of both Parquet datasets."""
    from recarchive.export import ddl as tables

    root = tables.dataset_location(location, load_settings().parquet_root)
    if database is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", database):
        # It goes between backticks into the DDL: a name, never more SQL.
        raise InputError(f"--database: not an Athena database name: {database[:80]!r}")
    first_month = first_month or tables.DEFAULT_FIRST_MONTH
    if dialect is Dialect.GLUE:
        inputs = tables.glue_table_inputs(root, first_month=first_month, only=table)
        # One table: its TableInput as it is, for `aws glue create-table --table-input`.
        document = inputs if table is None else inputs[table]
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
        return
    sys.stdout.write(
        tables.athena_ddl(root, database=database, first_month=first_month, only=table)
    )
