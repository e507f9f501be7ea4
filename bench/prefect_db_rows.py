"""Rows and bytes one ``archive_recordings`` flow run leaves in Prefect's own database.

Run:  .venv/bin/python -m bench.prefect_db_rows [--ids 2000] [--chunk-size 100]

Starts the Bird simulator (own process) and Prefect's test API (a SQLite database of its
own), runs the flow once on a warm-up of a few IDs, counts every table's rows, runs it again
on ``--ids`` IDs (metadata only, ``--chunk-size`` IDs per chunk task), and prints what the
second run added per table, per chunk task and per flow run, with the database file's growth.
For sizing Prefect's database (docs/deploy.md); the figures are rows, which carry over to a
PostgreSQL-backed server, and SQLite bytes, which are indicative only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sqlite3
import tempfile
import time
from pathlib import Path

from bench.client_throughput import _ids
from bench.flow_overhead import _env
from bench.sim_process import simulator_process


def _database_path() -> Path:
    from prefect.settings import get_current_settings

    secret = get_current_settings().server.database.connection_url
    assert secret is not None, "the test harness sets a SQLite database URL"
    return Path(secret.get_secret_value().split("///", 1)[1])


def _counts(path: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        tables = [
            row[0]
            for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        return {
            name: int(connection.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0])
            for name in tables
        }


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


async def _run(ids: list[str], env: dict[str, str], manifest: Path) -> None:
    from flows.archive import archive_recordings

    os.environ.update(env)
    await asyncio.to_thread(manifest.write_text, "\n".join(ids) + "\n")
    counts = await archive_recordings(ids_file=str(manifest), skip_media=True)
    assert counts["metadata_only"] == len(ids), counts


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ids", type=int, default=2000)
    parser.add_argument("--chunk-size", type=int, default=100)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with (
        simulator_process(recordings=args.ids + 20, seed=9) as sim,
        tempfile.TemporaryDirectory() as tmp,
        prefect_test_harness(server_startup_timeout=120),
    ):
        ids = await _ids(sim)
        root = Path(tmp)
        settings = argparse.Namespace(concurrency=32, chunk_size=args.chunk_size)
        for name in ("warm", "run"):
            (root / name).mkdir()
        path = _database_path()
        await _run(
            ids[: args.ids // 10 or 1],
            _env(sim.api_url, sim.workspace_id, sim.access_key, root / "warm", settings),
            root / "warm" / "ids.txt",
        )
        await asyncio.sleep(5)  # let the server's event recorders catch up
        before, size_before = _counts(path), _bytes(path)
        started = time.perf_counter()
        await _run(
            ids[20 : 20 + args.ids],
            _env(sim.api_url, sim.workspace_id, sim.access_key, root / "run", settings),
            root / "run" / "ids.txt",
        )
        seconds = time.perf_counter() - started
        await asyncio.sleep(10)
        after, size_after = _counts(path), _bytes(path)
    chunks = -(-args.ids // args.chunk_size)
    print(
        f"one archive_recordings flow run: {args.ids} IDs, {chunks} chunk tasks of "
        f"{args.chunk_size}, metadata only, {seconds:.1f} s"
    )
    print(f"  {'table':<28} {'rows added':>10} {'per chunk task':>15}")
    for name in sorted(after):
        added = after[name] - before.get(name, 0)
        if added:
            print(f"  {name:<28} {added:>10} {added / chunks:>15.1f}")
    print(
        f"  SQLite file (+WAL) grew by {(size_after - size_before) / 1024:.0f} KiB = "
        f"{(size_after - size_before) / chunks / 1024:.1f} KiB per chunk task"
    )


if __name__ == "__main__":
    asyncio.run(main())
