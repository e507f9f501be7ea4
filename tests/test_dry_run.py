"""``--dry-run`` of ``archive`` and ``retry-failed``: no request, no write, the real run's counts.

The ledger is put in every state a real run meets (archived, metadata only, missing, failed
due and not due, pending rows of a killed run, rows a live run holds, IDs never seen); the dry
run's plan is then compared with what the simulator, the database and the bucket saw, and with
what the real run right after it does.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import insert, text, update
from sqlalchemy.exc import DBAPIError

from recarchive.simulator.server import SimulatorServer
from recarchive.store.archive import ArchiveStore
from recarchive.store.engine import create_engine_for, open_read_only
from recarchive.store.tables import archive_ledger, runs
from tests.fixtures.cli import Invoke, cli_invoker, contract_env
from tests.fixtures.simulator import SimulatorFactory

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

LIVE_OWNER = "other-host:4242:live0001"


@pytest.fixture
def sim(simulator_factory: SimulatorFactory) -> SimulatorServer:
    return simulator_factory(
        recordings=1000, seed=11, missing_fraction=0.05, media_size_range=(400, 2000)
    )


@pytest.fixture
def env(tmp_path: Path, s3_bucket: str, s3_endpoint: str, sim: SimulatorServer) -> dict[str, str]:
    database = tmp_path / "db" / "archive.db"
    return contract_env(tmp_path, sim, s3_bucket, s3_endpoint, database=database)


@pytest.fixture
def invoke(env: dict[str, str]) -> Invoke:
    return cli_invoker(env)


def write_ids(path: Path, ids: list[str]) -> str:
    path.write_text("".join(f"{recording_id}\n" for recording_id in ids))
    return str(path)


def data_files(folder: Path) -> dict[str, str]:
    """Every file under ``folder``, name → SHA-256, but SQLite's -wal/-shm side files.

    Opening a WAL database read only may create those (store.engine.open_read_only says why
    that is preferred to an ``immutable`` read); the database file itself must not change.
    """
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.endswith(("-wal", "-shm"))
    }


def snapshot(folder: Path, s3: S3Client, bucket: str) -> dict[str, Any]:
    """Every data file under ``folder`` and every object of ``bucket`` (key → ETag)."""
    files = data_files(folder)
    listing = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {"files": files, "objects": {item["Key"]: item["ETag"] for item in listing}}


def distinct_fetched(sim: SimulatorServer) -> set[str]:
    """IDs whose metadata the simulator was asked for (GET of the recording itself)."""
    return {
        r.path.rsplit("/", 1)[-1]
        for r in sim.api_requests()
        if r.method == "GET" and not r.path.endswith((".mp3", "/recordings"))
    }


def last_run(database: Path) -> dict[str, Any]:
    engine = create_engine_for(f"sqlite:///{database}")
    try:
        with engine.connect() as connection:
            row = connection.execute(text("SELECT * FROM runs ORDER BY id DESC LIMIT 1")).one()
            return dict(row._mapping)
    finally:
        engine.dispose()


def mixed_ledger(invoke: Invoke, tmp_path: Path, sim: SimulatorServer) -> dict[str, list[str]]:
    """Put the ledger in every state; return the IDs of each group."""
    ids = list(sim.dataset.all_ids)
    groups = {
        "earlier": ids[0:300],  # a real run: archived, metadata_only (media not ready), missing
        "failed_due": ids[300:340],
        "failed_not_due": ids[340:380],
        "orphan_pending": ids[380:430],
        "live_pending": ids[430:450],
        "erased": ids[450:470],
        "new": ids[470:1000],
    }
    result = invoke("archive", "--ids-file", write_ids(tmp_path / "earlier.txt", groups["earlier"]))
    assert result.exit_code in (0, 1), result.output
    database = tmp_path / "db" / "archive.db"
    engine = create_engine_for(f"sqlite:///{database}")
    store = ArchiveStore(engine)
    registered = [
        *groups["failed_due"],
        *groups["failed_not_due"],
        *groups["orphan_pending"],
        *groups["live_pending"],
        *groups["erased"],
    ]
    store.register(registered)
    now = datetime.now(UTC)
    ledger = archive_ledger
    with engine.begin() as connection:
        for group, due in (("failed_due", now - timedelta(hours=1)), ("failed_not_due", None)):
            connection.execute(
                update(ledger)
                .where(ledger.c.recording_id.in_(groups[group]))
                .values(state="failed", attempts=1, last_error="HTTP 503", next_attempt_at=due)
            )
        # A live run on another host holds these: its heartbeat is fresh, its lease runs.
        connection.execute(
            insert(runs).values(
                kind="archive",
                status="running",
                started_at=now,
                heartbeat_at=now,
                owner=LIVE_OWNER,
                params="{}",
            )
        )
        connection.execute(
            update(ledger)
            .where(ledger.c.recording_id.in_(groups["live_pending"]))
            .values(lease_owner=LIVE_OWNER, lease_expires_at=now + timedelta(hours=1))
        )
        connection.execute(
            update(ledger)
            .where(ledger.c.recording_id.in_(groups["erased"]))
            .values(state="erased", last_error="erased on request: test")
        )
    engine.dispose()
    return groups


def test_archive_dry_run_sends_nothing_writes_nothing_and_counts_what_the_run_does(
    invoke: Invoke, tmp_path: Path, sim: SimulatorServer, s3_client: S3Client, s3_bucket: str
) -> None:
    groups = mixed_ledger(invoke, tmp_path, sim)
    every = list(sim.dataset.all_ids)
    ids_path = write_ids(tmp_path / "all.txt", every)
    states = ledger_states(tmp_path / "db" / "archive.db")
    before = snapshot(tmp_path, s3_client, s3_bucket)
    sim.clear_requests()

    result = invoke("archive", "--ids-file", ids_path, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout.strip().splitlines()[-1])

    assert sim.requests == []
    assert snapshot(tmp_path, s3_client, s3_bucket) == before
    earlier = [states[recording_id] for recording_id in groups["earlier"]]
    expected = {
        "new": len(groups["new"]),
        "pending": len(groups["orphan_pending"]),
        "media_recheck": earlier.count("metadata_only"),
        "failed_retry": len(groups["failed_due"])
        + len(groups["failed_not_due"])
        + earlier.count("failed"),
        "refresh": 0,
        "busy": len(groups["live_pending"]),
        "already_archived": earlier.count("archived"),
        "missing": earlier.count("missing"),
        "erased": len(groups["erased"]),
        "not_due": 0,
    }
    assert earlier.count("archived") > 100 and earlier.count("missing") > 0  # a mixed ledger
    assert plan["counts"] == expected
    assert plan["requested"] == len(every)
    assert plan["database"] != "missing"

    # The real run: the IDs it asks the API about, and its counts, are the plan's.
    real = invoke("archive", "--ids-file", ids_path)
    assert real.exit_code in (0, 1), real.output
    run = last_run(tmp_path / "db" / "archive.db")
    assert len(distinct_fetched(sim)) == plan["to_fetch"]
    assert run["already_archived"] == expected["already_archived"]
    assert run["busy"] == expected["busy"]
    assert run["erased"] == expected["erased"]
    assert run["missing"] >= expected["missing"]  # plus the new IDs that answer 404


def ledger_states(database: Path) -> dict[str, str]:
    engine = create_engine_for(f"sqlite:///{database}")
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT recording_id, state FROM archive_ledger"))
            return {row.recording_id: row.state for row in rows}
    finally:
        engine.dispose()


def test_retry_failed_dry_run_takes_what_the_real_retry_takes(
    invoke: Invoke, tmp_path: Path, sim: SimulatorServer, s3_client: S3Client, s3_bucket: str
) -> None:
    groups = mixed_ledger(invoke, tmp_path, sim)
    before = snapshot(tmp_path, s3_client, s3_bucket)
    sim.clear_requests()

    result = invoke("retry-failed", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    assert sim.requests == []
    assert snapshot(tmp_path, s3_client, s3_bucket) == before
    assert plan["counts"]["pending"] == len(groups["orphan_pending"])  # not the live run's
    assert plan["counts"]["failed_retry"] >= len(groups["failed_due"])
    assert plan["counts"]["not_due"] >= len(groups["failed_not_due"])
    assert plan["counts"]["busy"] == 0 and plan["counts"]["new"] == 0

    real = invoke("retry-failed")
    assert real.exit_code in (0, 1), real.output
    assert len(distinct_fetched(sim)) == plan["to_fetch"]
    assert last_run(tmp_path / "db" / "archive.db")["requested"] == plan["to_fetch"]


def test_dry_run_without_a_database_creates_none(
    invoke: Invoke, tmp_path: Path, sim: SimulatorServer
) -> None:
    ids = list(sim.dataset.all_ids[:25])
    result = invoke("archive", "--ids-file", write_ids(tmp_path / "ids.txt", ids), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "25 recordings: 25 would be fetched" in result.output
    assert not (tmp_path / "db").exists()
    assert sim.requests == []
    retry = invoke("retry-failed", "--dry-run", "--json")
    assert json.loads(retry.stdout)["requested"] == 0
    assert not (tmp_path / "db").exists()


@pytest.mark.parametrize(
    ("revision", "words"),
    [("0001", "older than this recarchive's"), ("9999", "newer than this recarchive's")],
    ids=["older-schema", "newer-schema"],
)
def test_dry_run_refuses_a_schema_it_does_not_read_and_leaves_it(
    invoke: Invoke, tmp_path: Path, sim: SimulatorServer, revision: str, words: str
) -> None:
    ids = sim.dataset.all_ids[:5]
    assert invoke("archive", "--skip-media", *ids).exit_code in (0, 1)
    database = tmp_path / "db" / "archive.db"
    engine = create_engine_for(f"sqlite:///{database}")
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    engine.dispose()
    files = data_files(database.parent)
    sim.clear_requests()

    result = invoke("archive", *ids, "--dry-run")
    assert result.exit_code == 2
    assert words in result.output and f"revision {revision}" in result.output
    assert data_files(database.parent) == files
    assert sim.requests == []


def test_dry_run_exits_2_on_invalid_ids_like_the_real_run(
    invoke: Invoke, tmp_path: Path, sim: SimulatorServer
) -> None:
    ids_path = write_ids(tmp_path / "ids.txt", [sim.dataset.all_ids[0], "not-a-uuid"])
    real = invoke("archive", "--ids-file", ids_path)
    dry = invoke("archive", "--ids-file", ids_path, "--dry-run")
    assert real.exit_code == dry.exit_code == 2
    assert "not-a-uuid" in dry.output
    assert sim.requests == []


def test_window_dry_run_requests_only_list_pages(
    invoke: Invoke, tmp_path: Path, sim: SimulatorServer
) -> None:
    result = invoke(
        "archive", "--since", "2025-03-01", "--until", "2025-05-01", "--dry-run", "--json"
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    listed = [r for r in sim.api_requests() if r.path.endswith("/recordings")]
    assert listed and len(listed) == len(sim.requests)  # list pages and nothing else
    expected = len(
        sim.dataset.ids_created_between(
            datetime(2025, 3, 1, tzinfo=UTC), datetime(2025, 5, 1, tzinfo=UTC)
        )
    )
    assert plan["counts"]["new"] == expected > 0
    assert not (tmp_path / "db").exists()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_dry_run_on_postgresql_reads_in_read_only_sessions(
    invoke: Invoke, sim: SimulatorServer, database_url: str
) -> None:
    ids = sim.dataset.ids[:30]
    # An empty database: every ID is new, and still no table afterwards.
    empty = invoke("archive", *ids, "--dry-run", "--json", RECARCHIVE_DATABASE_URL=database_url)
    assert empty.exit_code == 0, empty.output
    assert json.loads(empty.stdout)["counts"]["new"] == len(ids)
    engine = create_engine_for(database_url)
    with engine.connect() as connection:
        assert not connection.execute(text("SELECT to_regclass('archive_ledger')")).scalar()
    engine.dispose()

    assert invoke("archive", *ids[:20], RECARCHIVE_DATABASE_URL=database_url).exit_code == 0
    sim.clear_requests()
    result = invoke("archive", *ids, "--dry-run", "--json", RECARCHIVE_DATABASE_URL=database_url)
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert sim.requests == []
    engine = create_engine_for(database_url)
    with engine.connect() as connection:
        states: dict[str, int] = dict(
            connection.execute(
                text("SELECT state, count(*) FROM archive_ledger GROUP BY state")
            ).all()
        )
    engine.dispose()
    assert plan["counts"]["new"] == 10
    assert plan["counts"]["already_archived"] == states.get("archived", 0)
    assert plan["counts"]["media_recheck"] == states.get("metadata_only", 0)
    assert plan["to_fetch"] == 10 + states.get("metadata_only", 0)

    read_only = open_read_only(database_url)
    assert read_only is not None
    with read_only.connect() as connection, pytest.raises(DBAPIError, match="read-only"):
        connection.execute(text("CREATE TABLE dry_run_wrote (x int)"))
    read_only.dispose()


def _dead_local_owner() -> str:
    child = subprocess.Popen(["true"])
    child.wait()
    return f"{socket.gethostname()}:{child.pid}:deadbeef"


def _killed_run(database: Path, ids: list[str]) -> None:
    """A run of this host killed a moment ago: running, fresh heartbeat, leases on ``ids``."""
    engine = create_engine_for(f"sqlite:///{database}")
    owner, now = _dead_local_owner(), datetime.now(UTC)
    with engine.begin() as connection:
        run_id = connection.execute(
            insert(runs)
            .values(
                kind="archive",
                status="running",
                started_at=now,
                heartbeat_at=now,
                owner=owner,
                params="{}",
            )
            .returning(runs.c.id)
        ).scalar_one()
    ArchiveStore(engine).register(ids, run_id=run_id)
    with engine.begin() as connection:
        connection.execute(
            update(archive_ledger)
            .where(archive_ledger.c.recording_id.in_(ids[: len(ids) // 2]))
            .values(lease_owner=owner, lease_expires_at=now + timedelta(hours=1))
        )
    engine.dispose()


@pytest.mark.parametrize("command", ["retry-failed", "archive"])
def test_dry_run_counts_what_the_run_takes_after_a_local_kill(
    invoke: Invoke, tmp_path: Path, sim: SimulatorServer, command: str
) -> None:
    # The real run first finishes the killed run's row as interrupted and takes its rows
    # (pending, half of them still leased to the dead process); the dry run must agree.
    ids = list(sim.dataset.ids)
    assert invoke("archive", "--skip-media", *ids[:3]).exit_code in (0, 1)
    _killed_run(tmp_path / "db" / "archive.db", ids[10:30])
    args = [command] if command == "retry-failed" else [command, *ids[10:30]]
    dry = invoke(*args, "--dry-run", "--json")
    plan = json.loads(dry.stdout.strip().splitlines()[-1])
    assert plan["counts"]["pending"] == 20 and plan["counts"]["busy"] == 0
    sim.clear_requests()
    assert invoke(*args, "--skip-media").exit_code in (0, 1)
    assert len(distinct_fetched(sim)) == plan["to_fetch"] == 20
