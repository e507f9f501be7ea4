"""``recarchive ddl athena|glue``: the DDL's columns are the Arrow schema's, projection on
``created_month``, and the location rules (exit 2 without an S3 location).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner, Result

from recarchive.cli.app import app
from recarchive.export.ddl import athena_ddl, glue_table_inputs, hive_type
from recarchive.export.schema import PARTIES_SCHEMA, RECORDINGS_SCHEMA, TABLE_SCHEMAS

ROOT = "s3://analytics-bucket/recarchive/parquet"

#: Kept by hand here on purpose, apart from export/ddl.py: what Athena calls each Arrow type.
EXPECTED_TYPES = {
    pa.string(): "string",
    pa.int64(): "bigint",
    pa.float64(): "double",
    pa.bool_(): "boolean",
    pa.timestamp("us", tz="UTC"): "timestamp",
}


def expected_columns(schema: pa.Schema) -> list[tuple[str, str]]:
    return [(field.name, EXPECTED_TYPES[field.type]) for field in schema]


def statement_of(ddl: str, table: str) -> str:
    match = re.search(
        rf"CREATE EXTERNAL TABLE IF NOT EXISTS `{table}` \((.*?)\n\)\n(.*?);", ddl, re.S
    )
    assert match, ddl
    return match.group(0)


def ddl_columns(statement: str) -> list[tuple[str, str]]:
    """The column list of a CREATE EXTERNAL TABLE statement (not its partition column)."""
    body = statement.split("(\n", 1)[1].split("\n)\n", 1)[0]
    columns = []
    for line in body.splitlines():
        match = re.fullmatch(r"  `([^`]+)` ([a-z0-9]+(?:\(\d+,\d+\))?),?", line)
        assert match, line
        columns.append((match.group(1), match.group(2)))
    return columns


def properties(statement: str) -> dict[str, str]:
    return dict(re.findall(r"'([^']+)' = '([^']*)'", statement))


@pytest.mark.parametrize("table", list(TABLE_SCHEMAS))
def test_athena_columns_are_the_arrow_schema(table: str) -> None:
    statement = statement_of(athena_ddl(ROOT), table)
    assert ddl_columns(statement) == expected_columns(TABLE_SCHEMAS[table])
    assert "PARTITIONED BY (`created_month` string)\nSTORED AS PARQUET\n" in statement
    assert f"LOCATION '{ROOT}/{table}/'" in statement
    assert properties(statement) == {
        "projection.enabled": "true",
        "projection.created_month.type": "date",
        "projection.created_month.format": "yyyy-MM",
        "projection.created_month.interval": "1",
        "projection.created_month.interval.unit": "MONTHS",
        "projection.created_month.range": "2020-01,NOW",
        "storage.location.template": f"{ROOT}/{table}/created_month=${{created_month}}/",
    }


def test_the_check_fails_for_a_schema_with_one_more_column() -> None:
    # Control: the comparison above does see a column the DDL lacks.
    wider = RECORDINGS_SCHEMA.append(pa.field("sentiment", pa.string()))
    statement = statement_of(athena_ddl(ROOT), "recordings")
    assert ddl_columns(statement) != expected_columns(wider)
    assert ddl_columns(statement) == expected_columns(wider)[:-1]


def test_every_dataset_type_maps_and_an_unknown_one_is_refused() -> None:
    for schema in (RECORDINGS_SCHEMA, PARTIES_SCHEMA):
        for field in schema:
            assert hive_type(field.type) == EXPECTED_TYPES[field.type]
    assert hive_type(pa.int32()) == "int" and hive_type(pa.decimal128(12, 2)) == "decimal(12,2)"
    with pytest.raises(TypeError, match="no Athena type"):
        hive_type(pa.list_(pa.string()))


def test_glue_table_inputs_have_the_same_columns_and_projection() -> None:
    inputs = glue_table_inputs(ROOT)
    assert list(inputs) == list(TABLE_SCHEMAS)
    athena = athena_ddl(ROOT)
    for table, schema in TABLE_SCHEMAS.items():
        table_input = inputs[table]
        columns = [(c["Name"], c["Type"]) for c in table_input["StorageDescriptor"]["Columns"]]
        assert columns == expected_columns(schema)
        assert table_input["PartitionKeys"] == [{"Name": "created_month", "Type": "string"}]
        assert table_input["StorageDescriptor"]["Location"] == f"{ROOT}/{table}/"
        params = table_input["Parameters"]
        assert params["classification"] == "parquet"
        assert {k: v for k, v in params.items() if k not in {"classification", "EXTERNAL"}} == (
            properties(statement_of(athena, table))
        )


def invoke(*args: str, **env: str) -> Result:
    return CliRunner().invoke(app, ["ddl", *args], env=env)


def test_cli_location_from_the_parquet_root_or_the_flag(tmp_path: Path) -> None:
    result = invoke("athena", RECARCHIVE_PARQUET_ROOT=ROOT)
    assert result.exit_code == 0, result.output
    assert result.stdout == athena_ddl(ROOT)
    # A local Parquet root: --location is required (exit 2), and then used.
    local = {"RECARCHIVE_PARQUET_ROOT": str(tmp_path)}
    refused = invoke("athena", **local)
    assert refused.exit_code == 2 and "--location" in refused.stderr and refused.stdout == ""
    given = invoke("athena", "--location", "s3://other/data/", "--database", "calls", **local)
    assert given.exit_code == 0
    assert "CREATE EXTERNAL TABLE IF NOT EXISTS `calls`.`recordings` (" in given.stdout
    assert "LOCATION 's3://other/data/recordings/'" in given.stdout
    assert invoke("athena", "--location", "/data", **local).exit_code == 2
    assert invoke("athena", "--first-month", "2020-13", RECARCHIVE_PARQUET_ROOT=ROOT).exit_code == 2


def test_cli_glue_one_table_is_a_table_input_as_is() -> None:
    result = invoke("glue", "--table", "recording_parties", RECARCHIVE_PARQUET_ROOT=ROOT)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == glue_table_inputs(ROOT)["recording_parties"]
    both = invoke("glue", RECARCHIVE_PARQUET_ROOT=ROOT)
    assert set(json.loads(both.stdout)) == {"recordings", "recording_parties"}
    assert invoke("glue", "--table", "calls", RECARCHIVE_PARQUET_ROOT=ROOT).exit_code == 2


@pytest.mark.parametrize(
    "database",
    ["x`; DROP TABLE recordings; --", "a b", "", "1abc"],
    ids=["injection", "space", "empty", "digit-first"],
)
def test_a_database_that_is_not_a_name_is_refused(database: str) -> None:
    result = CliRunner().invoke(
        app, ["ddl", "athena", "--database", database], env={"RECARCHIVE_PARQUET_ROOT": "s3://b/p"}
    )
    assert result.exit_code == 2
    assert "CREATE" not in result.output
