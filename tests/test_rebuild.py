"""``recarchive rebuild``: archive, lose the database and the Parquet root, rebuild, compare rows.

Every row of the rebuilt ``recordings``, ``recording_parties`` and ``archive_ledger`` tables and
of both Parquet datasets must equal the original's, except run history and fetch timestamps;
S3 is never written to.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.dataset as ds
import pytest
from sqlalchemy import text
from typer.testing import Result

import recarchive.run.rebuild as rebuild_module
from recarchive.errors import RetryableError
from recarchive.media.inventory import StoredRecording, iter_recordings
from recarchive.media.keys import sidecar_key
from recarchive.simulator.server import SimulatorServer
from recarchive.store.engine import create_engine_for
from tests.fixtures.cli import Invoke, cli_invoker, contract_env
from tests.fixtures.simulator import SimulatorFactory

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

#: Ledger columns a rebuild restores; the others are run history (attempts, leases, when the
#: row was registered or last touched, which run registered it).
LEDGER_COLUMNS = "recording_id, state, s3_bucket, s3_key, size_bytes, sha256, archived_at"


@pytest.fixture
def sim(simulator_factory: SimulatorFactory) -> SimulatorServer:
    return simulator_factory(
        recordings=230, seed=21, available_fraction=0.9, media_size_range=(400, 3000)
    )


@pytest.fixture
def env(tmp_path: Path, s3_bucket: str, s3_endpoint: str, sim: SimulatorServer) -> dict[str, str]:
    database = tmp_path / "db" / "archive.db"
    return contract_env(tmp_path, sim, s3_bucket, s3_endpoint, database=database)


@pytest.fixture
def invoke(env: dict[str, str]) -> Invoke:
    return cli_invoker(env)


def words(result: Result) -> str:
    """The output with its line wrapping undone (rich wraps at the terminal's width)."""
    return " ".join(result.output.split())


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
    assert f"rebuilt {len(original['ledger'])} recordings" in words(result)

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
    assert "rebuild needs an empty database" in words(result)
    assert "3 ledger rows, 3 recordings and runs of archive" in words(result)


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
    shutil.rmtree(tmp_path / "parquet")
    result = invoke("rebuild")
    assert result.exit_code == 1
    assert "1 MP3s have no sidecar" in words(result) and ids[0] in result.output
    assert f"rebuilt {len(ids) - 1} recordings" in words(result)

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


def parquet_ids(parquet: Path) -> set[str]:
    table = ds.dataset(parquet / "recordings", format="parquet", partitioning="hive").to_table()
    return set(table.column("id").to_pylist())


def test_a_parquet_dataset_that_survived_is_not_replaced_unless_asked(
    invoke: Invoke, tmp_path: Path, sim: SimulatorServer
) -> None:
    # Only the database is lost. The dataset holds metadata-only recordings, which have no
    # object in S3: a full export of the rebuilt SQL would drop them.
    assert invoke("archive", *sim.dataset.ids).exit_code == 0
    parquet = tmp_path / "parquet"
    before = parquet_ids(parquet)
    shutil.rmtree(tmp_path / "db")
    refused = invoke("rebuild")
    assert refused.exit_code == 2
    assert "--overwrite-parquet" in words(refused)
    assert parquet_ids(parquet) == before
    shutil.rmtree(tmp_path / "db")
    result = invoke("rebuild", "--overwrite-parquet")
    assert result.exit_code == 0, result.output
    assert parquet_ids(parquet) < before  # what it was told to do: the archived ones only
    assert "list their window again" in words(result)


def test_rebuild_with_an_empty_s3_prefix_finds_the_archive(
    invoke: Invoke, tmp_path: Path, sim: SimulatorServer
) -> None:
    ids = sim.dataset.available_ids()[:5]
    assert invoke("archive", *ids, RECARCHIVE_S3_PREFIX="").exit_code == 0
    shutil.rmtree(tmp_path / "db")
    shutil.rmtree(tmp_path / "parquet")
    result = invoke("rebuild", RECARCHIVE_S3_PREFIX="")
    assert result.exit_code == 0, result.output
    assert "rebuilt 5 recordings" in words(result)


def test_an_interrupted_rebuild_is_continued_by_running_it_again(
    invoke: Invoke, tmp_path: Path, sim: SimulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert invoke("archive", *sim.dataset.ids).exit_code == 0
    database = tmp_path / "db" / "archive.db"
    original = everything(database, tmp_path / "parquet")
    shutil.rmtree(database.parent)
    shutil.rmtree(tmp_path / "parquet")
    real = iter_recordings

    def breaks(*args: Any, **kwargs: Any) -> Iterator[StoredRecording]:
        for number, item in enumerate(real(*args, **kwargs)):
            if number == 60:
                raise RetryableError("list: SlowDown (HTTP 503)")
            yield item

    monkeypatch.setattr(rebuild_module, "BATCH", 50)
    monkeypatch.setattr("recarchive.run.rebuild.iter_recordings", breaks)
    first = invoke("rebuild")
    assert first.exit_code != 0
    assert sql_rows(database, "SELECT status FROM runs") == [{"status": "failed"}]
    assert 0 < len(sql_rows(database, "SELECT recording_id FROM archive_ledger")) < 100
    monkeypatch.undo()
    again = invoke("rebuild")
    assert again.exit_code == 0, again.output
    assert everything(database, tmp_path / "parquet") == original
    statuses = sql_rows(database, "SELECT status FROM runs ORDER BY id")
    assert statuses == [{"status": "failed"}, {"status": "succeeded"}]
    # Once a rebuild succeeded, the database is no longer one to rebuild into.
    assert invoke("rebuild").exit_code == 2


@pytest.mark.parametrize("same_size", [False, True], ids=["shorter-body", "same-size-body"])
def test_with_verify_an_object_that_does_not_match_its_sha256_is_not_archived(
    invoke: Invoke,
    tmp_path: Path,
    sim: SimulatorServer,
    s3_client: S3Client,
    s3_bucket: str,
    same_size: bool,
) -> None:
    ids = sim.dataset.available_ids()[:3]
    assert invoke("archive", *ids).exit_code == 0
    database = tmp_path / "db" / "archive.db"
    row = sql_rows(
        database, f"SELECT s3_key, size_bytes FROM archive_ledger WHERE recording_id = '{ids[0]}'"
    )[0]
    head = s3_client.head_object(Bucket=s3_bucket, Key=row["s3_key"])
    # Replaced behind recarchive's back, its metadata kept: only a read of the bytes can tell.
    body = b"\xff" * row["size_bytes"] if same_size else b"ID3 damaged body"
    s3_client.put_object(Bucket=s3_bucket, Key=row["s3_key"], Body=body, Metadata=head["Metadata"])
    shutil.rmtree(tmp_path / "db")
    shutil.rmtree(tmp_path / "parquet")
    trusting = invoke("rebuild", "--overwrite-parquet")  # control: the metadata is trusted
    assert trusting.exit_code == 0
    assert "verify --deep" in words(trusting)
    deep = invoke("verify", "--deep")
    assert deep.exit_code == 1 and ids[0] in deep.output  # ... and verify --deep finds it
    shutil.rmtree(tmp_path / "db")
    result = invoke("rebuild", "--verify", "--overwrite-parquet")
    assert result.exit_code == 1
    assert "do not match its sha256 metadata" in words(result)
    state = sql_rows(database, f"SELECT state FROM archive_ledger WHERE recording_id = '{ids[0]}'")
    assert state == [{"state": "pending"}]  # the adopt path hashes it again before anything


def test_an_erased_recording_stays_erased_through_a_rebuild(
    invoke: Invoke, tmp_path: Path, sim: SimulatorServer
) -> None:
    ids = sim.dataset.available_ids()[:4]
    assert invoke("archive", *ids).exit_code == 0
    erased = invoke("erase", ids[0], "--reason", "caller asked (ticket 42)")
    assert erased.exit_code == 0, erased.output
    shutil.rmtree(tmp_path / "db")
    shutil.rmtree(tmp_path / "parquet")
    result = invoke("rebuild")
    assert result.exit_code == 0, result.output
    assert "1 erased recordings kept as tombstones" in words(result)
    database = tmp_path / "db" / "archive.db"
    row = sql_rows(
        database, f"SELECT state, last_error FROM archive_ledger WHERE recording_id = '{ids[0]}'"
    )
    assert row == [{"state": "erased", "last_error": "erased on request: caller asked (ticket 42)"}]
    assert sql_rows(database, f"SELECT id FROM recordings WHERE id = '{ids[0]}'") == []
    sim.clear_requests()
    assert invoke("archive", *ids).exit_code == 0
    assert not [r for r in sim.requests if ids[0] in r.path]  # never asked for again
