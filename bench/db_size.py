"""Ledger database and Parquet size per archived recording, for sizing (docs/deploy.md).

Run:  .venv/bin/python -m bench.db_size [--count 20000] [--postgres URL|auto|none]

Stores ``--count`` synthetic recordings (``bench.normalize_store``'s payloads) through the
real store API, the way a chunk does: register them to a ``runs`` row, claim them, save their
metadata, pin each S3 key, mark each ``archived`` (size and SHA-256), release the leases,
finish the run; then exports the Parquet dataset. It reports per table what the database
holds (PostgreSQL: ``pg_total_relation_size``, as written and after ``VACUUM FULL``; SQLite:
the file), bytes per recording, the Parquet folder's size, and all of it extrapolated to ten
million recordings. ``auto`` starts a throwaway PostgreSQL server like the test fixture does.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import shutil
import sqlite3
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, text

from bench.normalize_store import CHUNK, payloads
from bench.postgres import postgres_server

TARGET = 10_000_000
GiB = 1024**3


def store_archived(engine: Engine, count: int) -> dict[str, float]:
    """Store ``count`` recordings and their ledger rows as ``archived``; return timings."""
    from recarchive.leases import active_owner, run_owner
    from recarchive.model import LedgerState, RunStatus
    from recarchive.normalize import normalize_recording
    from recarchive.store.archive import ArchiveStore

    store = ArchiveStore(engine)
    owner = run_owner()
    fetched = datetime.now(UTC)
    raw_bytes = 0
    started = time.perf_counter()
    with active_owner(owner):
        run_id = store.start_run("archive", {"bench": "db_size", "count": count}, owner=owner)
        source = payloads(count)
        while batch := list(itertools.islice(source, CHUNK)):
            records = [
                normalize_recording(p, workspace_id="ws-bench", fetched_at=fetched) for p in batch
            ]
            ids = [record.id for record in records]
            store.register(ids, run_id=run_id)
            claimed = store.claim(ids, owner=owner, lease_seconds=900, states={LedgerState.PENDING})
            assert len(claimed) == len(ids), (len(claimed), len(ids))
            store.save_metadata(records)
            for record in records:
                raw_bytes += len(record.recording.get("raw_json") or "")
                day = record.created_at.strftime("%Y/%m/%d")
                bucket, key = store.pin_key(
                    record.id,
                    owner=owner,
                    bucket="recordings-bucket",
                    key=f"recordings/ws-bench/{day}/{record.id}.mp3",
                )
                store.mark_archived(
                    record.id,
                    owner=owner,
                    bucket=bucket,
                    key=key,
                    size_bytes=1_000_000,
                    sha256=hashlib.sha256(record.id.encode()).hexdigest(),
                )
            store.release(ids, owner=owner)
        store.finish_run(run_id, status=RunStatus.SUCCEEDED, counts={"archived": count})
    return {"store_seconds": time.perf_counter() - started, "raw_json_bytes": raw_bytes}


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def export_size(engine: Engine, root: Path) -> tuple[int, int]:
    """Export the dataset into ``root``; return ``(bytes, partitions)``."""
    from recarchive.export.parquet import export_changed

    report = export_changed(engine, str(root))
    return folder_bytes(root), len(report.partitions)


def postgres_sizes(engine: Engine) -> dict[str, tuple[int, int, int]]:
    """Table -> (total, heap, indexes) bytes for every table of the public schema."""
    query = text(
        "SELECT c.relname, pg_total_relation_size(c.oid), pg_relation_size(c.oid),"
        " pg_indexes_size(c.oid) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY 2 DESC"
    )
    with engine.connect() as connection:
        return {
            row[0]: (int(row[1]), int(row[2]), int(row[3])) for row in connection.execute(query)
        }


def print_table(title: str, sizes: dict[str, tuple[int, int, int]], count: int) -> int:
    total = sum(size[0] for size in sizes.values())
    print(f"  {title}: {total / 1024**2:.1f} MiB = {total / count:,.0f} B/recording")
    print(f"    {'table':<20} {'total':>10} {'heap+toast':>11} {'indexes':>10} {'B/rec':>7}")
    for name, (all_bytes, heap, indexes) in sizes.items():
        rest = all_bytes - indexes
        print(
            f"    {name:<20} {all_bytes / 1024**2:8.2f} MiB {rest / 1024**2:7.2f} MiB"
            f" {indexes / 1024**2:6.2f} MiB {all_bytes / count:7,.0f}"
        )
        del heap
    return total


def measure_postgres(url: str, count: int, work: Path) -> None:
    from recarchive.store.engine import create_engine_for, upgrade_database

    engine = create_engine_for(url)
    try:
        upgrade_database(engine)
        timing = store_archived(engine, count)
        parquet, partitions = export_size(engine, work / "parquet-pg")
        with engine.connect() as connection:
            connection.execute(text("ANALYZE"))
            connection.commit()
        written = postgres_sizes(engine)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("VACUUM FULL"))
        packed = postgres_sizes(engine)
        with engine.connect() as connection:
            database = int(
                connection.execute(text("SELECT pg_database_size(current_database())")).scalar_one()
            )
            version = connection.execute(text("SHOW server_version")).scalar_one()
    finally:
        engine.dispose()
    print(f"\n== PostgreSQL {version}: {count:,} archived recordings ==")
    print(
        f"  stored in {timing['store_seconds']:.1f} s; raw_json (redacted payload) averages "
        f"{timing['raw_json_bytes'] / count:,.0f} characters"
    )
    as_written = print_table("as written (before any vacuum)", written, count)
    after = print_table("after VACUUM FULL", packed, count)
    print(f"  pg_database_size after VACUUM FULL (incl. catalogs): {database / 1024**2:.1f} MiB")
    print(
        f"  Parquet export: {parquet / 1024**2:.2f} MiB in {partitions} monthly partitions = "
        f"{parquet / count:,.0f} B/recording"
    )
    print(
        f"  x {TARGET:,}: ledger database {after * TARGET / count / GiB:.1f} GiB (packed) to "
        f"{as_written * TARGET / count / GiB:.1f} GiB (as written); "
        f"Parquet {parquet * TARGET / count / GiB:.1f} GiB"
    )


def measure_sqlite(count: int, work: Path) -> None:
    from recarchive.store.engine import create_engine_for, upgrade_database

    path = work / "archive.db"
    engine = create_engine_for(f"sqlite:///{path}")
    try:
        upgrade_database(engine)
        timing = store_archived(engine, count)
        parquet, partitions = export_size(engine, work / "parquet-sqlite")
    finally:
        engine.dispose()
    # Outside the engine: its connections begin every statement with BEGIN IMMEDIATE.
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        written = path.stat().st_size
        connection.execute("VACUUM")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        packed = path.stat().st_size
    print(f"\n== SQLite: {count:,} archived recordings ==")
    print(f"  stored in {timing['store_seconds']:.1f} s")
    print(
        f"  file: {written / 1024**2:.1f} MiB as written = {written / count:,.0f} B/recording; "
        f"after VACUUM {packed / 1024**2:.1f} MiB = {packed / count:,.0f} B/recording"
    )
    print(
        f"  Parquet export: {parquet / 1024**2:.2f} MiB in {partitions} partitions = "
        f"{parquet / count:,.0f} B/recording"
    )
    print(f"  x {TARGET:,}: {packed * TARGET / count / GiB:.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument(
        "--postgres",
        default="auto",
        help="PostgreSQL server URL (a fresh database is made on it); 'auto' starts a "
        "throwaway server; 'none' skips",
    )
    parser.add_argument("--sqlite", action="store_true", help="measure SQLite as well")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recarchive-dbsize-"))
    try:
        if args.sqlite:
            measure_sqlite(args.count, work)
        if args.postgres == "none":
            return
        from tests.fixtures.postgres import fresh_postgres_database

        with (
            postgres_server(args.postgres) as url,
            fresh_postgres_database(url) as database_url,
        ):
            measure_postgres(database_url, args.count, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
