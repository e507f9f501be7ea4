"""Every flow under one session-scoped ``prefect_test_harness``, against the real servers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import prefect.deployments
import pytest
from flows.archive import archive_recordings
from flows.backfill import backfill
from flows.nightly import nightly_archive
from flows.retry import retry_failed_flow
from sqlalchemy import select, update

from recarchive.simulator.server import SimulatorServer
from recarchive.store.sql import create_engine_for
from recarchive.store.tables import archive_ledger
from tests.fixtures.simulator import SimulatorFactory


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """One Prefect test API for the whole session (it takes ~15 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as patch:
        # The server's telemetry write races the harness's start-up on SQLite ("database is
        # locked" in the log); tests do not need it.
        patch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture
def flow_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> dict[str, str]:
    """Point the flows' settings (read from the environment, as on a worker) at test servers."""
    env = {
        "RECARCHIVE_DATABASE_URL": f"sqlite:///{tmp_path / 'archive.db'}",
        "RECARCHIVE_PARQUET_ROOT": str(tmp_path / "parquet"),
        "RECARCHIVE_S3_BUCKET": s3_bucket,
        "RECARCHIVE_S3_ENDPOINT_URL": s3_endpoint,
        "RECARCHIVE_REQUESTS_PER_SECOND": "1000",
        "RECARCHIVE_TEMP_DIR": str(tmp_path),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def use_simulator(monkeypatch: pytest.MonkeyPatch, sim: SimulatorServer) -> None:
    monkeypatch.setenv("RECARCHIVE_BIRD_API_URL", sim.api_url)
    monkeypatch.setenv("RECARCHIVE_BIRD_ACCESS_KEY", sim.config.access_key)
    monkeypatch.setenv("RECARCHIVE_WORKSPACE_ID", sim.config.workspace_id)


def ledger(env: dict[str, str]) -> dict[str, str]:
    """Recording ID → ledger state."""
    engine = create_engine_for(env["RECARCHIVE_DATABASE_URL"])
    try:
        with engine.connect() as connection:
            rows = connection.execute(select(archive_ledger.c.recording_id, archive_ledger.c.state))
            return {row[0]: row[1] for row in rows}
    finally:
        engine.dispose()


async def task_runs_of(flow_run_id: uuid.UUID, expected: int) -> list[Any]:
    """Task runs of a flow run, waiting briefly: Prefect records them asynchronously."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    deadline = time.monotonic() + 30
    async with get_client() as client:
        while True:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                limit=200,
                sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            )
            if len(runs) >= expected or time.monotonic() > deadline:
                return list(runs)
            await asyncio.sleep(0.5)


async def artifact(key: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            limit=10,
            sort=ArtifactSort.CREATED_DESC,
        )
    return found[0] if found else None


async def test_archive_recordings_runs_one_task_per_chunk(
    prefect_api: None,
    flow_env: dict[str, str],
    simulator_factory: SimulatorFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim = simulator_factory(recordings=35, seed=41, available_fraction=1.0)
    use_simulator(monkeypatch, sim)
    # Typed as the flow's return value, but return_state=True gives the final State.
    state: Any = await archive_recordings(ids=sim.dataset.ids, chunk_size=10, return_state=True)
    counts = await state.result()
    assert counts["archived"] == 35 and counts["failed"] == 0
    assert set(ledger(flow_env).values()) == {"archived"}
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    runs = await task_runs_of(flow_run_id, expected=4)
    chunk_runs = [r for r in runs if r.name.startswith("chunk-from-")]
    assert len(chunk_runs) == 4  # 35 IDs in chunks of 10: tasks grow with chunks only
    table = await artifact("archive-recordings")
    assert table is not None and "archived" in str(table.data)
    assert (Path(flow_env["RECARCHIVE_PARQUET_ROOT"]) / "recordings").is_dir()


async def test_nightly_archives_exactly_the_window(
    prefect_api: None,
    flow_env: dict[str, str],
    simulator_factory: SimulatorFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim = simulator_factory(recordings=300, seed=43, available_fraction=1.0)
    use_simulator(monkeypatch, sim)
    result = await nightly_archive(day="2025-04-10", days=2, overlap_hours=6)
    since = datetime(2025, 4, 9, tzinfo=UTC) - timedelta(hours=6)
    until = datetime(2025, 4, 11, tzinfo=UTC)
    expected = set(sim.dataset.ids_created_between(since, until))
    assert expected, "the seed puts no recording in the window"
    assert set(ledger(flow_env)) == expected
    assert result["archive"]["archived"] == len(expected)
    assert result["window"] == {"since": since.isoformat(), "until": until.isoformat()}
    assert await artifact("nightly-archive") is not None


async def test_retry_failed_flow_archives_due_failures(
    prefect_api: None,
    flow_env: dict[str, str],
    simulator_factory: SimulatorFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim = simulator_factory(recordings=40, seed=47, faults="500", available_fraction=1.0)
    use_simulator(monkeypatch, sim)
    monkeypatch.setenv("RECARCHIVE_HTTP_MAX_ATTEMPTS", "1")  # first run: 5xx are final
    first = await archive_recordings(ids=sim.dataset.ids, chunk_size=20)
    assert first["failed"] > 0
    failed = {rid for rid, state in ledger(flow_env).items() if state == "failed"}
    # Their next attempt is minutes away; make it due now.
    engine = create_engine_for(flow_env["RECARCHIVE_DATABASE_URL"])
    with engine.begin() as connection:
        connection.execute(
            update(archive_ledger)
            .where(archive_ledger.c.state == "failed")
            .values(next_attempt_at=datetime.now(UTC) - timedelta(minutes=1))
        )
    monkeypatch.setenv("RECARCHIVE_HTTP_MAX_ATTEMPTS", "6")
    sim.clear_requests()
    counts = await retry_failed_flow()
    assert counts["archived"] == len(failed) and counts["failed"] == 0
    assert set(ledger(flow_env).values()) == {"archived"}
    asked = {r.path.rsplit("/", 1)[1].removesuffix(".mp3") for r in sim.api_requests()}
    assert asked == failed  # only the failed ones were tried again


async def test_backfill_fans_out_manifests_with_idempotency_keys(
    prefect_api: None,
    flow_env: dict[str, str],
    simulator_factory: SimulatorFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    sim = simulator_factory(recordings=50, seed=53, available_fraction=1.0)
    use_simulator(monkeypatch, sim)
    ids_file = tmp_path / "backfill.txt"
    ids_file.write_text("\n".join(sim.dataset.ids) + "\n")
    calls: list[tuple[str, dict[str, Any], str]] = []

    # Prefect's deployment machinery needs a worker to run the children; here each child run
    # is the real archive flow, run in-process with exactly the parameters it would get.
    async def run_child(
        name: str, parameters: dict[str, Any], idempotency_key: str, **_: Any
    ) -> Any:
        calls.append((name, parameters, idempotency_key))
        state = await archive_recordings(**parameters, return_state=True)
        return SimpleNamespace(id=uuid.uuid4(), state=state)

    monkeypatch.setattr(prefect.deployments, "arun_deployment", run_child)
    result = await backfill(ids_file=str(ids_file), chunk_size=10, fan_out=True, chunks_per_child=2)
    assert len(calls) == 3  # 50 IDs, 20 per child
    assert {name for name, _, _ in calls} == {"archive-recordings/archive-ids"}
    assert all("ids" not in params and params["ids_file"] for _, params, _ in calls)
    keys = [key for _, _, key in calls]
    assert len(set(keys)) == 3 and all(key.endswith(f"-{n:05d}") for n, key in enumerate(keys))
    assert [child["state"] for child in result["children"]] == ["Completed"] * 3
    assert set(ledger(flow_env)) == set(sim.dataset.ids)
    assert set(ledger(flow_env).values()) == {"archived"}


async def test_backfill_window_without_fan_out(
    prefect_api: None,
    flow_env: dict[str, str],
    simulator_factory: SimulatorFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim = simulator_factory(recordings=120, seed=59)
    use_simulator(monkeypatch, sim)
    counts = await backfill(since="2025-05-01", until="2025-06-01", skip_media=True)
    expected = sim.dataset.ids_created_between(
        datetime(2025, 5, 1, tzinfo=UTC), datetime(2025, 6, 1, tzinfo=UTC)
    )
    assert counts["metadata_only"] == len(expected) > 0
    assert set(ledger(flow_env)) == set(expected)
