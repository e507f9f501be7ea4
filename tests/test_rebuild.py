"""``recarchive rebuild``: archive, lose the database and the Parquet root, rebuild, compare rows.

Every row of the rebuilt ``recordings``, ``recording_parties`` and ``archive_ledger`` tables and
of both Parquet datasets must equal the original's, except run history and fetch timestamps;
S3 is never written to.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.dataset as ds
import pytest
from sqlalchemy import text
from typer.testing import CliRunner, Result

from recarchive.cli.app import app
from recarchive.media.keys import sidecar_key
from recarchive.simulator.server import SimulatorServer
from recarchive.store.engine import create_engine_for
from tests.fixtures.simulator import SimulatorFactory

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

Invoke = Callable[..., Result]
#: Ledger columns a rebuild restores; the others are run history (attempts, leases, when the
#: row was registered or last touched, which run registered it).
LEDGER_COLUMNS = "recording_id, state, s3_bucket, s3_key, size_bytes, sha256"


@pytest.fixture
def sim(simulator_factory: SimulatorFactory) -> SimulatorServer:
    return simulator_factory(
        recordings=230, seed=21, available_fraction=0.9, media_size_range=(400, 3000)
    )


@pytest.fixture
def env(tmp_path: Path, s3_bucket: str, s3_endpoint: str, sim: SimulatorServer) -> dict[str, str]:
    return {
        "RECARCHIVE_DATABASE_URL": f"sqlite:///{tmp_path / 'db' / 'archive.db'}",
        "RECARCHIVE_PARQUET_ROOT": str(tmp_path / "parquet"),
        "RECARCHIVE_S3_BUCKET": s3_bucket,
        "RECARCHIVE_S3_ENDPOINT_URL": s3_endpoint,
        "RECARCHIVE_REQUESTS_PER_SECOND": "1000",
        "RECARCHIVE_BIRD_API_URL": sim.api_url,
        "RECARCHIVE_BIRD_ACCESS_KEY": sim.config.access_key,
        "RECARCHIVE_WORKSPACE_ID": sim.config.workspace_id,
    }


@pytest.fixture
def invoke(env: dict[str, str]) -> Invoke:
    def run(*args: str, **extra: str) -> Result:
        return CliRunner().invoke(app, list(args), env={**env, **extra}, catch_exceptions=False)

    return run


def sql_rows(database: Path, query: str) -> list[dict[str, Any]]:
    engine = create_engine_for(f"sqlite:///{database}")
    try:
        with engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(text(query))]
    finally:
        engine.dispose()


def everything(database: Path, parquet: Path) -> dict[str, list[dict[str, Any]]]:
    """Rows of the archived recordings in SQL and Parquet, without the fetch timestamps."""
    archived = "SELECT recording_id FROM archive_ledger WHERE state = 'archived'"
    recordings = sql_rows(
        database, f"SELECT * FROM recordings WHERE id IN ({archived}) ORDER BY id"
    )
    for row in recordings:
        del row["fetched_at"]
    parties = sql_rows(
        database,
        f"SELECT * FROM recording_parties WHERE recording_id IN ({archived}) "
        "ORDER BY recording_id, role",
    )
    ledger = sql_rows(
        database,
        f"SELECT {LEDGER_COLUMNS} FROM archive_ledger WHERE state = 'archived' ORDER BY 1",
    )
    ids = {row["recording_id"] for row in ledger}
    result = {"recordings": recordings, "parties": parties, "ledger": ledger}
    for name, key in (("recordings", "id"), ("recording_parties", "recording_id")):
        table = ds.dataset(parquet / name, format="parquet", partitioning="hive").to_table()
        rows = [row for row in table.to_pylist() if row[key] in ids]
        for row in rows:
            row.pop("fetched_at", None)
            row.pop("archived_at", None)
        result[f"parquet_{name}"] = sorted(rows, key=lambda row: (row[key], row.get("role", "")))
    return result


def bucket_state(s3: S3Client, bucket: str) -> dict[str, tuple[str, str]]:
    listing = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {item["Key"]: (item["ETag"], str(item["LastModified"])) for item in listing}


def test_rebuild_from_the_archive_alone_gives_back_every_row(
    invoke: Invoke, tmp_path: Path, sim: SimulatorServer, s3_client: S3Client, s3_bucket: str
) -> None:
    ids = sim.dataset.ids
    assert invoke("archive", *ids).exit_code == 0
    database, parquet = tmp_path / "db" / "archive.db", tmp_path / "parquet"
    original = everything(database, parquet)
    assert len(original["ledger"]) >= 200
    assert len(original["parquet_recording_parties"]) >= len(original["ledger"])
    objects = bucket_state(s3_client, s3_bucket)

    shutil.rmtree(database.parent)
    shutil.rmtree(parquet)
    sim.clear_requests()
    result = invoke("rebuild")
    assert result.exit_code == 0, result.output
    assert f"rebuilt {len(original['ledger'])} recordings" in result.output

    assert sim.requests == []  # nothing asked of Bird
    assert bucket_state(s3_client, s3_bucket) == objects  # nothing written to S3
    rebuilt = everything(database, parquet)
    for name, rows in original.items():
        assert rebuilt[name] == rows, name

    # The next run of the same IDs fetches only what was never archived.
    sim.clear_requests()
    assert invoke("archive", *ids).exit_code == 0
    fetched = {r.path.rsplit("/", 1)[-1] for r in sim.api_requests()}
    archived = {row["recording_id"] for row in original["ledger"]}
    assert fetched == set(ids) - archived
    assert sim.media_requests() == []


def test_rebuild_refuses_a_database_that_is_not_empty(
    invoke: Invoke, sim: SimulatorServer, tmp_path: Path
) -> None:
    assert invoke("archive", *sim.dataset.ids[:3]).exit_code == 0
    result = invoke("rebuild")
    assert result.exit_code == 2
    assert "rebuild needs an empty database" in result.output
    assert "3 ledger rows" in result.output


def test_an_mp3_without_its_sidecar_is_listed_and_adopted_by_the_next_run(
    invoke: Invoke, tmp_path: Path, sim: SimulatorServer, s3_client: S3Client, s3_bucket: str
) -> None:
    ids = sim.dataset.available_ids()[:10]
    assert invoke("archive", *ids).exit_code == 0
    key = sql_rows(
        tmp_path / "db" / "archive.db",
        f"SELECT s3_key FROM archive_ledger WHERE recording_id = '{ids[0]}'",
    )[0]["s3_key"]
    s3_client.delete_object(Bucket=s3_bucket, Key=sidecar_key(key))  # a run killed in between
    shutil.rmtree(tmp_path / "db")
    result = invoke("rebuild")
    assert result.exit_code == 1
    assert "1 MP3s have no sidecar" in result.output and ids[0] in result.output
    assert f"rebuilt {len(ids) - 1} recordings" in result.output

    sim.clear_requests()
    assert invoke("retry-failed").exit_code == 0  # takes the pending row no run holds
    assert {r.path.rsplit("/", 1)[-1] for r in sim.api_requests()} == {ids[0]}
    assert sim.media_requests() == []  # adopted at its key, not downloaded again
    ledger = sql_rows(
        tmp_path / "db" / "archive.db",
        f"SELECT state, s3_key FROM archive_ledger WHERE recording_id = '{ids[0]}'",
    )
    assert ledger == [{"state": "archived", "s3_key": key}]
    s3_client.head_object(Bucket=s3_bucket, Key=sidecar_key(key))  # and its sidecar is back
