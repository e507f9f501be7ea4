"""Every flow under one session-scoped ``prefect_test_harness``, against the real servers.

The harness and the helpers shared with ``test_flow_states.py``: ``tests/fixtures/prefect.py``.
"""

from __future__ import annotations

import logging
import uuid
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

from recarchive.errors import InputError, StorageUnavailableError
from recarchive.simulator.server import SimulatorServer
from recarchive.store.engine import create_engine_for, upgrade_database
from recarchive.store.tables import archive_ledger, listed_windows
from tests.fixtures.prefect import artifact, ledger, task_runs_of, use_simulator
from tests.fixtures.simulator import SimulatorFactory


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


# --- nightly: windows from the scheduled day and the listed_windows ledger ------------------
# These tables are read and written with the plain table (not recarchive.store.windows) so the
# tests say the same thing about any version of the flow.

SIX_HOURS = timedelta(hours=6)


def april(day: int, hour: int = 0) -> datetime:
    return datetime(2025, 4, day, hour, tzinfo=UTC)


def window(since: datetime, until: datetime) -> dict[str, str]:
    """A window as the nightly flow reports it."""
    return {"since": since.isoformat(), "until": until.isoformat()}


def listed(env: dict[str, str]) -> list[tuple[datetime, datetime]]:
    """The recorded ``listed_windows``, oldest first."""
    engine = create_engine_for(env["RECARCHIVE_DATABASE_URL"])
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                select(listed_windows.c.window_start, listed_windows.c.window_end).order_by(
                    listed_windows.c.window_start
                )
            )
            return [(row[0], row[1]) for row in rows]
    finally:
        engine.dispose()


def seed_listed_window(env: dict[str, str], since: datetime, until: datetime) -> None:
    """Record a window as an earlier nightly run would have (on a freshly upgraded ledger)."""
    engine = create_engine_for(env["RECARCHIVE_DATABASE_URL"])
    try:
        upgrade_database(engine)
        with engine.begin() as connection:
            connection.execute(
                listed_windows.insert().values(
                    window_start=since, window_end=until, listed_at=until, recordings=0
                )
            )
    finally:
        engine.dispose()


async def scheduled_nightly(scheduled: datetime, **parameters: Any) -> Any:
    """Run ``nightly-archive`` as a worker runs a scheduled run; return its final state.

    The flow run is created in a ``Scheduled`` state for ``scheduled`` (what the scheduler
    does) and then executed in this process by Prefect's engine (what a worker does), so the
    run starts now: long after ``scheduled``, like a very late worker.
    """
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow_async
    from prefect.states import Scheduled

    async with get_client() as client:
        flow_run = await client.create_flow_run(
            nightly_archive, parameters=parameters, state=Scheduled(scheduled_time=scheduled)
        )
    return await run_flow_async(
        nightly_archive, flow_run=flow_run, parameters=parameters, return_type="state"
    )


def nightly_simulator(simulator_factory: SimulatorFactory, seed: int) -> SimulatorServer:
    """About five recordings per day, every one with (small) media."""
    return simulator_factory(
        recordings=900, seed=seed, available_fraction=1.0, media_size_range=(4_000, 16_000)
    )


async def test_nightly_after_two_missed_nights_covers_all_three_days(
    prefect_api: None,
    flow_env: dict[str, str],
    simulator_factory: SimulatorFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim = nightly_simulator(simulator_factory, seed=61)
    use_simulator(monkeypatch, sim)
    first = await (await scheduled_nightly(april(10, 2))).result()
    assert first["window"] == window(april(9) - SIX_HOURS, april(10))
    # The worker is down for the runs of 04-11 and 04-12; the run of 04-13 covers their days.
    third = await (await scheduled_nightly(april(13, 2))).result()
    assert third["window"] == window(april(10) - SIX_HOURS, april(13))
    for day in (10, 11, 12):
        created = set(sim.dataset.ids_created_between(april(day), april(day + 1)))
        assert created and created <= set(ledger(flow_env)), f"04-{day} not archived"
    assert set(ledger(flow_env)) == set(
        sim.dataset.ids_created_between(april(9) - SIX_HOURS, april(13))
    )
    assert set(ledger(flow_env).values()) == {"archived"}
    assert listed(flow_env) == [
        (april(9) - SIX_HOURS, april(10)),
        (april(10) - SIX_HOURS, april(13)),
    ]


async def test_nightly_failed_night_is_listed_again_by_the_next(
    prefect_api: None,
    flow_env: dict[str, str],
    simulator_factory: SimulatorFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import flows.nightly

    sim = nightly_simulator(simulator_factory, seed=67)
    use_simulator(monkeypatch, sim)
    await (await scheduled_nightly(april(10, 2))).result()
    archived_first = set(ledger(flow_env))
    assert archived_first

    async def lost_database(*_: Any, **__: Any) -> Any:
        raise StorageUnavailableError("cannot open the database: OperationalError")

    # The run of 04-11 lists its window, then the archive run fails.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(flows.nightly, "archive_ids", lost_database)
        failed = await scheduled_nightly(april(11, 2))
    assert failed.is_failed()
    assert listed(flow_env) == [(april(9) - SIX_HOURS, april(10))]  # 04-10 not recorded

    sim.clear_requests()
    third = await (await scheduled_nightly(april(12, 2))).result()
    assert third["window"] == window(april(10) - SIX_HOURS, april(12))
    assert set(ledger(flow_env)) == set(
        sim.dataset.ids_created_between(april(9) - SIX_HOURS, april(12))
    )
    assert set(ledger(flow_env).values()) == {"archived"}
    # The overlap listed some of the first night's recordings again: no request for them.
    asked = {r.path.rsplit("/", 1)[1].removesuffix(".mp3") for r in sim.api_requests()}
    assert not asked & archived_first
    assert listed(flow_env)[-1] == (april(10) - SIX_HOURS, april(12))


async def test_nightly_late_start_lists_the_scheduled_day(
    prefect_api: None,
    flow_env: dict[str, str],
    simulator_factory: SimulatorFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect.client.orchestration import get_client

    sim = nightly_simulator(simulator_factory, seed=71)
    use_simulator(monkeypatch, sim)
    seed_listed_window(flow_env, april(8) - SIX_HOURS, april(9))
    state = await scheduled_nightly(april(9, 2))
    result = await state.result()
    async with get_client() as client:
        flow_run = await client.read_flow_run(state.state_details.flow_run_id)
    assert flow_run.start_time is not None
    started = datetime.fromisoformat(flow_run.start_time.isoformat())
    assert started - april(9, 2) > timedelta(days=1)  # started days late
    assert result["window"] == window(april(8) - SIX_HOURS, april(9))  # as on time
    assert set(ledger(flow_env)) == set(
        sim.dataset.ids_created_between(april(8) - SIX_HOURS, april(9))
    )


async def test_nightly_without_a_schedule_ends_at_todays_midnight(
    prefect_api: None,
    flow_env: dict[str, str],
    simulator_factory: SimulatorFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim = simulator_factory(recordings=20, seed=73, available_fraction=1.0)
    use_simulator(monkeypatch, sim)
    before = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    result = await nightly_archive(skip_media=True)  # an ad-hoc run: no scheduled time
    after = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    until = datetime.fromisoformat(result["window"]["until"])
    assert until in {before, after}
    assert datetime.fromisoformat(result["window"]["since"]) == until - timedelta(days=1, hours=6)


async def test_nightly_gap_over_max_catch_up_days_lists_the_oldest_days_first(
    prefect_api: None,
    flow_env: dict[str, str],
    simulator_factory: SimulatorFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sim = nightly_simulator(simulator_factory, seed=79)
    use_simulator(monkeypatch, sim)
    seed_listed_window(flow_env, april(1) - SIX_HOURS, april(1))  # listed up to 04-01 00:00
    first = await (await scheduled_nightly(april(20, 2))).result()  # max_catch_up_days=7
    assert first["window"] == window(april(1) - SIX_HOURS, april(8))
    assert first["days_behind"] == 12
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("19 days behind" in message for message in warnings), warnings
    assert set(ledger(flow_env)) == set(
        sim.dataset.ids_created_between(april(1) - SIX_HOURS, april(8))
    )
    second = await (await scheduled_nightly(april(21, 2), max_catch_up_days=14)).result()
    assert second["window"] == window(april(8) - SIX_HOURS, april(21))
    assert second["days_behind"] == 0
    assert [until for _, until in listed(flow_env)] == [april(1), april(8), april(21)]


async def test_nightly_rerun_of_a_past_day_keeps_the_catch_up_point(
    prefect_api: None,
    flow_env: dict[str, str],
    simulator_factory: SimulatorFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim = nightly_simulator(simulator_factory, seed=83)
    use_simulator(monkeypatch, sim)
    seed_listed_window(flow_env, april(12, 18), april(14))  # listed up to 04-14 00:00
    rerun = await nightly_archive(day="2025-04-05")
    assert rerun["window"] == window(april(5) - SIX_HOURS, april(6))
    assert set(ledger(flow_env)) == set(
        sim.dataset.ids_created_between(april(5) - SIX_HOURS, april(6))
    )
    assert listed(flow_env) == [(april(5) - SIX_HOURS, april(6)), (april(12, 18), april(14))]
    # The next scheduled night continues from 04-14, not from the re-run's end.
    night = await (await scheduled_nightly(april(15, 2))).result()
    assert night["window"] == window(april(14) - SIX_HOURS, april(15))


async def test_retry_failed_flow_archives_due_failures(
    prefect_api: None,
    flow_env: dict[str, str],
    simulator_factory: SimulatorFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim = simulator_factory(recordings=40, seed=47, faults="500", available_fraction=1.0)
    use_simulator(monkeypatch, sim)
    monkeypatch.setenv("RECARCHIVE_HTTP_MAX_ATTEMPTS", "1")  # first run: 5xx are final
    first = await archive_recordings(ids=list(sim.dataset.ids), chunk_size=20)
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


@pytest.mark.parametrize(
    ("split", "expected"),
    [({"chunks_per_child": 2}, 3), ({"children": 4}, 4), ({}, 8)],
    ids=["chunks-per-child", "children", "default-children"],
)
async def test_backfill_fans_out_manifests_with_idempotency_keys(
    prefect_api: None,
    flow_env: dict[str, str],
    simulator_factory: SimulatorFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    split: dict[str, int],
    expected: int,
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
    result = await backfill(
        ids_file=str(ids_file),
        chunk_size=10,
        fan_out=True,
        children=split.get("children"),
        chunks_per_child=split.get("chunks_per_child"),
    )
    # 50 IDs: 20 per child (2 chunks of 10), 13 per child (4 children), or 7 (8 children).
    assert len(calls) == expected
    assert {name for name, _, _ in calls} == {"archive-recordings/archive-ids"}
    assert all("ids" not in params and params["ids_file"] for _, params, _ in calls)
    keys = [key for _, _, key in calls]
    assert len(set(keys)) == expected
    assert all(key.endswith(f"-{n:05d}") for n, key in enumerate(keys))
    assert [child["state"] for child in result["children"]] == ["Completed"] * expected
    assert set(ledger(flow_env)) == set(sim.dataset.ids)
    assert set(ledger(flow_env).values()) == {"archived"}


async def test_backfill_refuses_two_ways_of_splitting_before_any_request(
    prefect_api: None,
    flow_env: dict[str, str],
    simulator_factory: SimulatorFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim = simulator_factory(recordings=5, seed=61)
    use_simulator(monkeypatch, sim)
    with pytest.raises(InputError, match="not both"):
        await backfill(since="2025-05-01", fan_out=True, children=2, chunks_per_child=2)
    assert sim.api_requests() == []


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
