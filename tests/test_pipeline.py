"""The pipeline's chunk and the run around it: leases stay held while a slow chunk works; a
run stopped by a fatal error still records what it did."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from recarchive.config import Settings
from recarchive.errors import AuthError
from recarchive.ids.read import collect_ids
from recarchive.model import RunCounts
from recarchive.run.chunk import _Chunk, archive_chunk
from recarchive.run.clients import open_archive_context
from recarchive.run.context import ArchiveContext, ChunkOptions
from recarchive.run.database import open_store
from recarchive.run.runs import archive_ids
from tests.fixtures.simulator import SimulatorFactory


async def intruder_claims_during_a_slow_chunk(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> list[str]:
    """Run a chunk that outlives its 2 s lease; return what another run could claim."""
    sim = simulator_factory(recordings=12, seed=71, rate_limit=3)
    settings = Settings(
        bird_api_url=sim.api_url,
        bird_access_key=sim.config.access_key,
        workspace_id=sim.config.workspace_id,
        database_url=f"sqlite:///{tmp_path / 'archive.db'}",
        requests_per_second=3,  # 12 recordings take ~4 s: twice the lease
    )
    engine, store = open_store(settings)
    stolen: list[str] = []
    try:
        async with open_archive_context(settings, store, skip_media=True) as ctx:
            ctx = dataclasses.replace(ctx, lease_seconds=2, concurrency=2)
            chunk = asyncio.create_task(
                archive_chunk(ctx, sim.dataset.ids, ChunkOptions(skip_media=True))
            )
            while not chunk.done():
                await asyncio.sleep(0.25)
                stolen += await asyncio.to_thread(
                    store.claim,
                    sim.dataset.ids,
                    owner="intruder",
                    lease_seconds=60,
                    states={"pending"},
                )
            counts = await chunk
        assert counts.metadata_only + counts.busy == 12
    finally:
        engine.dispose()
    return stolen


async def test_leases_are_renewed_while_a_chunk_works(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> None:
    assert await intruder_claims_during_a_slow_chunk(simulator_factory, tmp_path) == []


async def test_without_renewal_the_lease_would_expire_mid_chunk(
    simulator_factory: SimulatorFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The control experiment: proves the test above could fail.
    async def no_renewal(self: _Chunk, claimed: list[str]) -> None:
        return None

    monkeypatch.setattr(_Chunk, "_renew_leases", no_renewal)
    assert await intruder_claims_during_a_slow_chunk(simulator_factory, tmp_path) != []


async def test_a_run_stopped_by_a_fatal_error_keeps_the_counts_of_finished_chunks(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> None:
    sim = simulator_factory(recordings=10, seed=72)
    settings = Settings(
        bird_api_url=sim.api_url,
        bird_access_key=sim.config.access_key,
        workspace_id=sim.config.workspace_id,
        database_url=f"sqlite:///{tmp_path / 'archive.db'}",
        chunk_size=5,
    )
    seen: list[list[str]] = []

    async def second_chunk_loses_its_credentials(
        ctx: ArchiveContext, chunk: list[str], options: ChunkOptions
    ) -> RunCounts:
        seen.append(chunk)
        if len(seen) == 2:
            raise AuthError("Bird refused the access key (401)")
        return await archive_chunk(ctx, chunk, options)

    with collect_ids(sim.dataset.ids, spool_dir=str(tmp_path)) as ids, pytest.raises(AuthError):
        await archive_ids(
            settings,
            ids,
            ChunkOptions(skip_media=True),
            run_chunk=second_chunk_loses_its_credentials,
        )
    engine, store = open_store(settings)
    try:
        (run,) = store.last_runs(limit=5)
    finally:
        engine.dispose()
    assert [len(chunk) for chunk in seen] == [5, 5]
    assert run["status"] == "failed" and run["error"].startswith("AuthError")
    # The first chunk's five recordings are in the row, not zeros.
    assert run["metadata_only"] == 5 and run["requested"] == 5


async def test_a_fan_out_parent_registers_every_id_before_its_children_start(
    tmp_path: Path,
) -> None:
    from recarchive.run.runs import registered_input

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'archive.db'}")
    batch = [f"00000000-0000-4000-8000-{index:012d}" for index in range(1, 1201)]
    async with registered_input(settings, iter(batch), kind="backfill-parent", params={}):
        engine, store = open_store(settings)
        try:
            assert store.counts()["pending"] == 1200
            # Left to the live parent: retry-failed does not take them while it waits.
            assert store.due_retries(limit=10, max_attempts=8) == []
        finally:
            engine.dispose()
    engine, store = open_store(settings)
    try:
        (run,) = store.last_runs(limit=5)
        assert run["kind"] == "backfill-parent" and run["requested"] == 1200
        # The parent ended with rows no child reached: now retry-failed takes them.
        assert len(store.due_retries(limit=2000, max_attempts=8)) == 1200
    finally:
        engine.dispose()


async def test_every_id_of_a_run_is_in_the_ledger_before_its_first_request(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> None:
    sim = simulator_factory(recordings=12, seed=73)
    settings = Settings(
        bird_api_url=sim.api_url,
        bird_access_key=sim.config.access_key,
        workspace_id=sim.config.workspace_id,
        database_url=f"sqlite:///{tmp_path / 'archive.db'}",
        chunk_size=3,
    )
    seen: list[int] = []

    async def first_chunk_looks_at_the_ledger(
        ctx: ArchiveContext, chunk: list[str], options: ChunkOptions
    ) -> RunCounts:
        if not seen:
            assert sim.api_requests() == []
            seen.append(len(ctx.store.get_entries(sim.dataset.ids)))
        return await archive_chunk(ctx, chunk, options)

    with collect_ids(sim.dataset.ids, spool_dir=str(tmp_path)) as ids:
        await archive_ids(
            settings, ids, ChunkOptions(skip_media=True), run_chunk=first_chunk_looks_at_the_ledger
        )
    assert seen == [12]
