"""The pipeline's chunk: leases stay held while a slow chunk works."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from recarchive.config import Settings
from recarchive.pipeline import ChunkOptions, _Chunk, archive_chunk
from recarchive.runtime import open_archive_context, open_store
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
