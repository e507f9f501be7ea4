"""Throughput of the ``archive_recordings`` flow against the pipeline called directly.

Run: ``.venv/bin/python -m bench.flow_overhead [--ids 20000] [--chunk-size 500]``.
Both archive the same IDs, metadata only (``skip_media``), from the simulator (own process)
into a fresh SQLite database, with the same chunk size, concurrency and parallel chunks, and
both end with the Parquet export. The flow runs under a local Prefect test API, started and
warmed up before the clock starts (its 10-20 s start-up is a one-off per process).
Target: flow throughput / direct throughput >= 0.9.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from bench.client_throughput import _ids
from bench.sim_process import simulator_process
from recarchive.config import Settings
from recarchive.ids.spool import spool_ids
from recarchive.run.context import ChunkOptions
from recarchive.run.runs import archive_ids


def _env(
    sim_api: str, workspace: str, key: str, folder: Path, args: argparse.Namespace
) -> dict[str, str]:
    return {
        "RECARCHIVE_BIRD_API_URL": sim_api,
        "RECARCHIVE_BIRD_ACCESS_KEY": key,
        "RECARCHIVE_WORKSPACE_ID": workspace,
        "RECARCHIVE_DATABASE_URL": f"sqlite:///{folder / 'archive.db'}",
        "RECARCHIVE_PARQUET_ROOT": str(folder / "parquet"),
        "RECARCHIVE_REQUESTS_PER_SECOND": "100000",
        "RECARCHIVE_CONCURRENCY": str(args.concurrency),
        "RECARCHIVE_CHUNK_SIZE": str(args.chunk_size),
        "RECARCHIVE_TEMP_DIR": str(folder),
    }


async def direct(ids: list[str], env: dict[str, str], parallel: int) -> float:
    """Seconds for the pipeline called directly (what `recarchive archive` does)."""
    os.environ.update(env)
    settings = Settings()
    with spool_ids(ids, source="bench") as id_list:
        started = time.perf_counter()
        report = await archive_ids(
            settings, id_list, ChunkOptions(skip_media=True), max_parallel_chunks=parallel
        )
        seconds = time.perf_counter() - started
    assert report.counts.metadata_only == len(ids), report.counts
    return seconds


async def through_flow(ids: list[str], env: dict[str, str], parallel: int, manifest: Path) -> float:
    """Seconds for the same IDs through the ``archive_recordings`` flow (from a manifest)."""
    from flows.archive import archive_recordings

    os.environ.update(env)
    await asyncio.to_thread(manifest.write_text, "\n".join(ids) + "\n")
    started = time.perf_counter()
    counts = await archive_recordings(
        ids_file=str(manifest), skip_media=True, max_parallel_chunks=parallel
    )
    seconds = time.perf_counter() - started
    assert counts["metadata_only"] == len(ids), counts
    return seconds


async def main() -> None:
    """Measure both and print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ids", type=int, default=20_000)
    parser.add_argument("--chunk-size", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--parallel-chunks", type=int, default=2)
    args = parser.parse_args()

    # The server's telemetry write races the harness's start-up on SQLite ("database is
    # locked"); it is noise here.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with (
        simulator_process(recordings=args.ids, seed=5) as sim,
        tempfile.TemporaryDirectory() as tmp,
        prefect_test_harness(server_startup_timeout=120),
    ):
        ids = await _ids(sim)
        root = Path(tmp)
        for name in ("warm", "direct", "flow"):
            (root / name).mkdir()

        def env(name: str) -> dict[str, str]:
            return _env(sim.api_url, sim.workspace_id, sim.access_key, root / name, args)

        # Warm-up: imports, the Prefect API's first requests, the simulator's caches.
        await through_flow(ids[:50], env("warm"), 1, root / "warm" / "ids.txt")
        direct_seconds = await direct(ids, env("direct"), args.parallel_chunks)
        flow_seconds = await through_flow(
            ids, env("flow"), args.parallel_chunks, root / "flow" / "ids.txt"
        )
    chunks = -(-len(ids) // args.chunk_size)
    direct_rate = len(ids) / direct_seconds
    flow_rate = len(ids) / flow_seconds
    print(
        f"{len(ids)} IDs, metadata only, chunks of {args.chunk_size} ({chunks} chunk tasks), "
        f"concurrency {args.concurrency}, {args.parallel_chunks} chunks in parallel"
    )
    print(f"  pipeline called directly: {direct_seconds:6.1f}s  {direct_rate:7.0f} rec/s")
    print(f"  archive_recordings flow:  {flow_seconds:6.1f}s  {flow_rate:7.0f} rec/s")
    print(f"  throughput ratio flow / direct: {flow_rate / direct_rate:.2f} (target >= 0.9)")


if __name__ == "__main__":
    asyncio.run(main())
