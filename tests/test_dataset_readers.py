"""Analysts outside DuckDB: the Parquet dataset read with Polars and pandas (pyarrow).

A few recordings archived end to end (simulator, moto's S3 server, SQLite, local Parquet);
both datasets read back with hive partitioning: types (timestamps tz-aware UTC, integers,
booleans) and row counts against SQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import polars as pl
import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from recarchive.cli.app import app
from recarchive.store.engine import create_engine_for
from tests.fixtures.cli import contract_env
from tests.fixtures.simulator import SimulatorFactory

TIMESTAMPS = ("created_at", "updated_at", "started_at", "ended_at", "fetched_at", "archived_at")
BOOLEANS = ("stereo", "transcription", "originator_number_anonymous")


@dataclass
class Archive:
    root: Path
    sql: dict[str, int]
    archived: int
    months: int


@pytest.fixture
def archive(
    simulator_factory: SimulatorFactory, tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> Iterator[Archive]:
    sim = simulator_factory(recordings=30, seed=11, faults="notready", available_fraction=1.0)
    env = contract_env(tmp_path, sim, s3_bucket, s3_endpoint)
    database = env["RECARCHIVE_DATABASE_URL"]
    result = CliRunner().invoke(app, ["archive", *sim.dataset.ids], env=env)
    assert result.exit_code == 0, result.output
    engine = create_engine_for(database)
    with engine.connect() as connection:
        sql = {
            table: connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
            for table in ("recordings", "recording_parties")
        }
        archived = connection.execute(
            text("SELECT count(*) FROM archive_ledger WHERE state = 'archived'")
        ).scalar_one()
    engine.dispose()
    months = len(list((tmp_path / "parquet" / "recordings").iterdir()))
    assert sql["recordings"] == 30 and sql["recording_parties"] > 0
    assert 0 < archived < 30  # some media not ready yet: null media columns too
    yield Archive(tmp_path / "parquet", sql, archived, months)


def test_polars_reads_both_datasets_with_their_types(archive: Archive) -> None:
    recordings = pl.read_parquet(
        archive.root / "recordings" / "**" / "*.parquet", hive_partitioning=True
    )
    parties = pl.read_parquet(
        archive.root / "recording_parties" / "**" / "*.parquet", hive_partitioning=True
    )
    assert recordings.height == archive.sql["recordings"]
    assert parties.height == archive.sql["recording_parties"]
    for column in TIMESTAMPS:
        assert recordings.schema[column] == pl.Datetime("us", "UTC"), column
    for column in BOOLEANS:
        assert recordings.schema[column] == pl.Boolean, column
    assert recordings.schema["media_size_bytes"] == pl.Int64
    assert recordings.schema["duration"] == pl.Float64
    assert parties.schema["number_anonymous"] == pl.Boolean
    assert (
        recordings["media_size_bytes"].null_count() == archive.sql["recordings"] - archive.archived
    )
    # The partition column comes from the folder names, and matches created_at.
    assert recordings["created_month"].n_unique() == archive.months
    assert (recordings["created_at"].dt.strftime("%Y-%m") == recordings["created_month"]).all()


def test_pandas_reads_both_datasets_with_their_types(archive: Archive) -> None:
    recordings = pd.read_parquet(archive.root / "recordings", engine="pyarrow")
    parties = pd.read_parquet(archive.root / "recording_parties", engine="pyarrow")
    assert len(recordings) == archive.sql["recordings"]
    assert len(parties) == archive.sql["recording_parties"]
    for column in TIMESTAMPS:
        dtype = recordings[column].dtype
        assert isinstance(dtype, pd.DatetimeTZDtype) and str(dtype.tz) == "UTC", column
    # Without nulls, numpy types; with nulls, pandas' own default turns ints into floats, so
    # the README tells analysts to ask for the nullable types, as here.
    assert recordings["stereo"].dtype == bool
    nullable = pd.read_parquet(
        archive.root / "recordings", engine="pyarrow", dtype_backend="numpy_nullable"
    )
    assert nullable["media_size_bytes"].dtype == pd.Int64Dtype()
    assert int(nullable["media_size_bytes"].isna().sum()) == len(recordings) - archive.archived
    assert nullable["originator_number_anonymous"].dtype == pd.BooleanDtype()
    assert isinstance(nullable["created_at"].dtype, pd.DatetimeTZDtype)
    assert recordings["created_month"].nunique() == archive.months
