"""``recarchive archive`` end to end: the simulator, moto's S3 server, SQLite/PostgreSQL.

Configured only by the environment variables of the contract (README, "Configuration"), as a
user would.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner, Result

import recarchive.media.spool
from recarchive.cli.app import app
from recarchive.config import Settings
from recarchive.ids.spool import spool_ids
from recarchive.media.keys import media_key, sidecar_key
from recarchive.run.context import ChunkOptions
from recarchive.run.database import open_store
from recarchive.run.runs import archive_ids
from recarchive.simulator.server import SimulatorServer
from recarchive.store.archive import ArchiveStore
from recarchive.store.engine import create_engine_for
from tests.fixtures.postgres import fresh_postgres_database
from tests.fixtures.s3_proxy import FaultProxy
from tests.fixtures.simulator import SimulatorFactory

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

Invoke = Callable[..., Result]
PREFIX = "recordings"


@pytest.fixture
def env(tmp_path: Path, s3_bucket: str, s3_fault_proxy: FaultProxy) -> dict[str, str]:
    """Contract environment, minus the Bird part (added per simulator)."""
    return {
        "RECARCHIVE_DATABASE_URL": f"sqlite:///{tmp_path / 'archive.db'}",
        "RECARCHIVE_PARQUET_ROOT": str(tmp_path / "parquet"),
        "RECARCHIVE_S3_BUCKET": s3_bucket,
        # Through the proxy, so the test sees every S3 request the run makes.
        "RECARCHIVE_S3_ENDPOINT_URL": s3_fault_proxy.url,
        "RECARCHIVE_REQUESTS_PER_SECOND": "1000",
    }


def bird_env(sim: SimulatorServer) -> dict[str, str]:
    return {
        "RECARCHIVE_BIRD_API_URL": sim.api_url,
        "RECARCHIVE_BIRD_ACCESS_KEY": sim.config.access_key,
        "RECARCHIVE_WORKSPACE_ID": sim.config.workspace_id,
    }


@pytest.fixture
def invoke(env: dict[str, str]) -> Invoke:
    def run(*args: str, sim: SimulatorServer | None = None, **extra: str) -> Result:
        full = {**env, **(bird_env(sim) if sim else {}), **extra}
        return CliRunner().invoke(app, list(args), env=full, catch_exceptions=False)

    return run


def ids_file(tmp_path: Path, ids: list[str]) -> Path:
    path = tmp_path / "ids.txt"
    lines = ["# nightly export", "", *ids, ids[0].upper()]  # a duplicate in another case
    path.write_text("\n".join(lines) + "\n")
    return path


def store_for(env: dict[str, str]) -> ArchiveStore:
    return ArchiveStore(create_engine_for(env["RECARCHIVE_DATABASE_URL"]))


def states(store: ArchiveStore) -> dict[str, int]:
    """Ledger rows per state, states with no rows left out."""
    return {state: count for state, count in store.counts().items() if count}


def corrupt_behind_metadata(
    env: dict[str, str], s3_client: S3Client, bucket: str, recording_id: str
) -> None:
    """Replace an archived object's bytes (same size, reversed), keeping its metadata."""
    victim = store_for(env).get_entries([recording_id])[recording_id]
    assert victim.s3_key is not None
    original = s3_client.get_object(Bucket=bucket, Key=victim.s3_key)
    s3_client.put_object(
        Bucket=bucket,
        Key=victim.s3_key,
        Body=original["Body"].read()[::-1],
        Metadata=original["Metadata"],
    )


def writes(proxy: FaultProxy) -> list[str]:
    return [info.target for info, _ in proxy.log if info.method in ("PUT", "POST", "DELETE")]


def test_archive_ids_file_archives_everything_and_rerun_transfers_nothing(
    simulator_factory: SimulatorFactory,
    invoke: Invoke,
    env: dict[str, str],
    tmp_path: Path,
    s3_client: S3Client,
    s3_bucket: str,
    s3_fault_proxy: FaultProxy,
) -> None:
    sim = simulator_factory(
        recordings=200,
        seed=21,
        faults="429,500,reset,slow,truncate,expired",
        available_fraction=1.0,
    )
    ids = list(sim.dataset.ids)
    result = invoke("archive", "--ids-file", str(ids_file(tmp_path, ids)), sim=sim)
    assert result.exit_code == 0, result.output
    assert sim.leaks == []
    assert states(store_for(env)) == {"archived": 200}
    for recording_id in ids:
        payload = sim.dataset.payload(recording_id)
        assert payload is not None
        created = datetime.fromisoformat(payload["createdAt"].replace("Z", "+00:00"))
        key = media_key(PREFIX, sim.config.workspace_id, recording_id, created)
        body = s3_client.get_object(Bucket=s3_bucket, Key=key)
        data = body["Body"].read()
        digest = hashlib.sha256(data).hexdigest()
        assert digest == sim.dataset.media(recording_id).sha256()
        assert body["Metadata"]["sha256"] == digest
        sidecar = s3_client.get_object(Bucket=s3_bucket, Key=sidecar_key(key))["Body"].read()
        assert json.loads(sidecar)["id"] == recording_id and b"X-Amz-Signature" not in sidecar
    media_puts = Counter(t for t in writes(s3_fault_proxy) if t.split("?")[0].endswith(".mp3"))
    assert all(count == 1 for count in media_puts.values()), media_puts

    sim.clear_requests()
    s3_fault_proxy.log.clear()
    again = invoke("archive", "--ids-file", str(ids_file(tmp_path, ids)), sim=sim)
    assert again.exit_code == 0, again.output
    assert sim.requests == []  # archived recordings cost no API request
    assert writes(s3_fault_proxy) == []  # and no S3 write
    assert "200" in again.output and "already" in again.output


def test_missing_and_not_ready_recordings(
    simulator_factory: SimulatorFactory, invoke: Invoke, env: dict[str, str]
) -> None:
    sim = simulator_factory(recordings=60, seed=8, faults="404,notready", available_fraction=1.0)
    ids = sim.dataset.ids
    missing = {rid for rid in ids if sim.faults.hits_recording("404", rid)}
    pending = {rid for rid in ids if rid not in missing and not sim.dataset.has_media(rid)}
    assert missing and pending
    first = invoke("archive", *ids, sim=sim)
    assert first.exit_code == 1, first.output  # missing recordings: exit 1
    entries = store_for(env).get_entries(ids)
    assert {rid for rid, e in entries.items() if e.state == "missing"} == missing
    assert {rid for rid, e in entries.items() if e.state == "metadata_only"} == pending
    # status --failed lists them too: a new "missing" field beside "failed", which keeps its
    # meaning (failed recordings only) for existing readers.
    doc = json.loads(invoke("status", "--failed", "--json").output)
    assert doc["failed"] == []
    assert {entry["id"] for entry in doc["missing"]} == missing
    listed = invoke("status", "--failed", "--limit", "500")
    assert listed.exit_code == 0 and "Missing recordings" in listed.output
    assert all(rid in listed.output for rid in missing)
    assert "missing" not in json.loads(invoke("status", "--json").output)  # only with --failed

    sim.dataset.make_all_available()
    sim.clear_requests()
    second = invoke("archive", *ids, sim=sim)
    assert second.exit_code == 1
    entries = store_for(env).get_entries(ids)
    assert all(entries[rid].state == "archived" for rid in pending)
    asked = {r.path.rsplit("/", 1)[1].removesuffix(".mp3") for r in sim.api_requests()}
    assert asked == pending  # neither missing nor archived ones were asked again


def test_invalid_ids_stop_before_any_request(
    simulator: SimulatorServer, invoke: Invoke, tmp_path: Path, env: dict[str, str]
) -> None:
    path = tmp_path / "ids.txt"
    good = simulator.dataset.ids[:3]
    path.write_text(f"{good[0]}\nnot-an-id\n{good[1]}\n\n12345\n{good[2]}\n")
    result = invoke("archive", "--ids-file", str(path), "--skip-media", sim=simulator)
    assert result.exit_code == 2
    assert "ids.txt:2" in result.output and "ids.txt:5" in result.output
    assert simulator.requests == []
    skipped = invoke(
        "archive", "--ids-file", str(path), "--skip-media", "--skip-invalid", sim=simulator
    )
    assert skipped.exit_code == 0, skipped.output
    assert set(store_for(env).get_entries(good)) == set(good)


def test_wrong_key_exits_2_without_leaking_it(simulator: SimulatorServer, invoke: Invoke) -> None:
    result = invoke(
        "archive",
        simulator.dataset.ids[0],
        sim=simulator,
        RECARCHIVE_BIRD_ACCESS_KEY="very-secret-wrong-key",
    )
    assert result.exit_code == 2
    assert "very-secret-wrong-key" not in result.output
    assert "Traceback" not in result.output and "access key" in result.output


def test_skip_media_needs_no_bucket(
    simulator: SimulatorServer, invoke: Invoke, env: dict[str, str]
) -> None:
    ids = simulator.dataset.ids[:10]
    result = invoke("archive", *ids, "--skip-media", sim=simulator, RECARCHIVE_S3_BUCKET="")
    assert result.exit_code == 0, result.output
    assert states(store_for(env)) == {"metadata_only": 10}
    assert simulator.media_requests() == []
    assert not any(r.path.endswith(".mp3") for r in simulator.requests)


def test_since_until_archives_exactly_the_window(
    simulator_factory: SimulatorFactory, invoke: Invoke, env: dict[str, str]
) -> None:
    sim = simulator_factory(recordings=80, seed=13)
    result = invoke(
        "archive", "--since", "2025-04-01", "--until", "2025-05-01", "--skip-media", sim=sim
    )
    assert result.exit_code == 0, result.output
    expected = sim.dataset.ids_created_between(
        datetime(2025, 4, 1, tzinfo=UTC), datetime(2025, 5, 1, tzinfo=UTC)
    )
    assert expected
    assert set(store_for(env).get_entries(sim.dataset.ids)) == set(expected)


def test_status_verify_and_refresh(
    simulator_factory: SimulatorFactory,
    invoke: Invoke,
    env: dict[str, str],
    s3_client: S3Client,
    s3_bucket: str,
) -> None:
    sim = simulator_factory(recordings=12, seed=31, available_fraction=1.0)
    ids = sim.dataset.ids
    assert invoke("archive", *ids, sim=sim).exit_code == 0
    status = invoke("status", "--json")
    assert status.exit_code == 0
    doc: dict[str, Any] = json.loads(status.output)
    assert (
        doc["states"]["archived"] == 12
        and sum(doc["states"].values()) == 12
        and doc["runs"][0]["archived"] == 12
    )

    assert invoke("verify").exit_code == 0
    deep = invoke("verify", "--deep")
    assert deep.exit_code == 0 and "12 ok" in deep.output

    # Same size, other bytes, metadata untouched: only --deep can tell.
    corrupt_behind_metadata(env, s3_client, s3_bucket, ids[0])
    assert invoke("verify").exit_code == 0
    tampered = invoke("verify", "--deep")
    assert tampered.exit_code == 1 and ids[0] in tampered.output

    sim.dataset.touch(ids[1], duration=4242)
    sim.clear_requests()
    refreshed = invoke("archive", *ids, "--refresh", sim=sim)
    assert refreshed.exit_code == 0, refreshed.output
    assert sim.media_requests() == [] and not any(
        r.path.endswith(".mp3") for r in sim.api_requests()
    )
    engine = create_engine_for(env["RECARCHIVE_DATABASE_URL"])
    with engine.connect() as connection:
        duration = connection.execute(
            text("SELECT duration FROM recordings WHERE id = :id"), {"id": ids[1]}
        ).scalar_one()
    assert duration == 4242


@pytest.mark.postgres
def test_two_concurrent_runs_never_transfer_a_recording_twice(
    simulator_factory: SimulatorFactory,
    postgres_url: str,
    s3_bucket: str,
    s3_fault_proxy: FaultProxy,
    tmp_path: Path,
) -> None:
    sim = simulator_factory(recordings=60, seed=17, faults="slow", available_fraction=1.0)
    with fresh_postgres_database(postgres_url) as database_url:
        settings = Settings(
            bird_api_url=sim.api_url,
            bird_access_key=sim.config.access_key,
            workspace_id=sim.config.workspace_id,
            database_url=database_url,
            parquet_root=str(tmp_path / "parquet"),
            s3_bucket=s3_bucket,
            s3_endpoint_url=s3_fault_proxy.url,
            requests_per_second=1000,
            chunk_size=10,
        )
        # Create the schema once, so the two runs do not race to migrate it.
        engine, _ = open_store(settings)
        engine.dispose()
        results: list[Any] = []

        def run() -> None:
            with spool_ids(sim.dataset.ids, source="test") as id_list:
                results.append(asyncio.run(archive_ids(settings, id_list, ChunkOptions())))

        threads = [threading.Thread(target=run) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert len(results) == 2
        archived = sum(r.counts.archived for r in results)
        assert archived == 60, [r.counts for r in results]
        media_puts = Counter(
            t.split("?")[0] for t in writes(s3_fault_proxy) if t.split("?")[0].endswith(".mp3")
        )
        assert len(media_puts) == 60 and set(media_puts.values()) == {1}
        links = Counter(r.path for r in sim.api_requests() if r.path.endswith(".mp3"))
        assert set(links.values()) == {1}
        engine = create_engine_for(database_url)
        assert states(ArchiveStore(engine)) == {"archived": 60}
        engine.dispose()


def test_delete_source_only_after_a_successful_deep_verify(
    simulator_factory: SimulatorFactory,
    invoke: Invoke,
    env: dict[str, str],
    s3_client: S3Client,
    s3_bucket: str,
) -> None:
    sim = simulator_factory(recordings=8, seed=37, available_fraction=1.0)
    ids = sim.dataset.ids
    assert invoke("archive", *ids, sim=sim).exit_code == 0
    # One object silently corrupted behind intact metadata: its source must survive.
    corrupt_behind_metadata(env, s3_client, s3_bucket, ids[0])
    sim.clear_requests()
    result = invoke("verify", "--delete-source-after-verify", sim=sim)
    assert result.exit_code == 1 and ids[0] in result.output
    deletes = [r for r in sim.api_requests() if r.method == "DELETE"]
    assert {r.path.rsplit("/", 1)[1] for r in deletes} == set(ids[1:])
    assert not sim.dataset.is_deleted(ids[0])
    assert all(sim.dataset.is_deleted(rid) for rid in ids[1:])
    # Each deletion is logged (the CLI's log goes to stderr, part of the output here).
    assert result.output.count("deleted source media at Bird") == 7


def test_retry_failed_archives_media_that_became_ready_later(
    simulator_factory: SimulatorFactory, invoke: Invoke, env: dict[str, str]
) -> None:
    sim = simulator_factory(recordings=30, seed=61, available_fraction=0.5)
    normal, skipped = sim.dataset.ids[:20], sim.dataset.ids[20:]
    pending = [rid for rid in normal if not sim.dataset.has_media(rid)]
    assert pending
    assert invoke("archive", *normal, sim=sim).exit_code == 0
    assert invoke("archive", *skipped, "--skip-media", sim=sim).exit_code == 0
    entries = store_for(env).get_entries(sim.dataset.ids)
    assert {rid for rid in normal if entries[rid].state == "metadata_only"} == set(pending)
    assert all(entries[rid].next_attempt_at is not None for rid in pending)
    assert all(entries[rid].next_attempt_at is None for rid in skipped)
    sim.dataset.make_all_available()
    sim.clear_requests()
    assert invoke("retry-failed", sim=sim).exit_code == 0
    assert sim.requests == []  # not due yet (an hour later)
    engine = create_engine_for(env["RECARCHIVE_DATABASE_URL"])
    with engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE archive_ledger SET next_attempt_at = :t WHERE next_attempt_at IS NOT NULL"
            ),
            {"t": datetime(2020, 1, 1, tzinfo=UTC)},
        )
    engine.dispose()
    result = invoke("retry-failed", sim=sim)
    assert result.exit_code == 0, result.output
    entries = store_for(env).get_entries(sim.dataset.ids)
    assert all(entries[rid].state == "archived" for rid in normal)
    assert all(entries[rid].state == "metadata_only" for rid in skipped)
    asked = {r.path.rsplit("/", 1)[1].removesuffix(".mp3") for r in sim.api_requests()}
    assert asked == set(pending)


def test_failed_export_keeps_the_run_summary_and_says_how_to_redo_it(
    simulator: SimulatorServer, invoke: Invoke, env: dict[str, str], tmp_path: Path
) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the Parquet root should be")
    ids = simulator.dataset.ids[:6]
    result = invoke(
        "archive", *ids, "--skip-media", sim=simulator, RECARCHIVE_PARQUET_ROOT=str(blocked)
    )
    assert result.exit_code == 1
    assert "requested" in result.output  # the summary table still printed
    assert "Parquet export failed" in result.output and "recarchive export" in result.output
    status = json.loads(invoke("status", "--json").output)
    assert status["runs"][0]["status"] == "partial"
    assert states(store_for(env)) == {"metadata_only": 6}
    redo = invoke("export")
    assert redo.exit_code == 0 and "exported 6 rows" in redo.output


def test_full_disk_stops_the_run_cleanly(
    simulator_factory: SimulatorFactory,
    invoke: Invoke,
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A full disk cannot be made safely here: the temp file creation reports ENOSPC instead.
    import errno
    import tempfile

    def no_space(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", no_space)
    # Small bodies wait in memory, never in a temp file: make every body take the file path.
    monkeypatch.setattr(recarchive.media.spool, "MEMORY_BODY_BYTES", 0)
    # The simulator runs in this process: when the stopping run drops its connections, the
    # server side may log aiohttp's "Error handling request" with a traceback into the same
    # stderr. That is the test server's output, not the CLI's; keep it out of the capture.
    for server_logger in ("recarchive.simulator", "aiohttp"):
        quiet = logging.getLogger(server_logger)
        monkeypatch.setattr(quiet, "propagate", False)
        monkeypatch.setattr(quiet, "handlers", [logging.NullHandler()])  # not lastResort either
    sim = simulator_factory(recordings=4, seed=73, available_fraction=1.0)
    result = invoke("archive", *sim.dataset.ids, sim=sim)
    assert result.exit_code == 1
    assert "No space left on device" in result.output and "Traceback" not in result.output
    entries = store_for(env).get_entries(sim.dataset.ids)
    # Nothing was marked failed for a local problem, and no lease is left behind.
    assert {e.state for e in entries.values()} <= {"pending"}
    assert all(e.lease_owner is None for e in entries.values())
