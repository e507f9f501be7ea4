"""Benchmark: 100,000 payloads through normalize -> SQL upsert (chunks of 500) -> Parquet export.

Run:  .tools/bin/uv run python -m bench.normalize_store [--count 100000] [--postgres URL|auto|none]

Each phase runs in its own (spawned) process so its peak RSS (``ru_maxrss``) is its own.
Baseline: the same payloads, minimally converted (no validation, no redaction) and inserted
with a bare DB-API ``executemany`` into a table of the same columns, no upsert, no parties,
no export: the floor of what storing these rows costs on the backend.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import resource
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.postgres import postgres_server
from recarchive.model import RECORDING_FIELDS

CHUNK = 500
STATUSES = ["available"] * 6 + ["completed", "accepted", "ongoing", "paused"]
BASE = datetime(2024, 7, 1, tzinfo=UTC)


def payloads(count: int) -> Iterator[dict[str, Any]]:
    """Deterministic payloads shaped like the seed document, spread over twelve months."""
    for index in range(count):
        created = BASE + timedelta(seconds=index * (365 * 86400 // max(count, 1)))
        recording_id = str(uuid.UUID(int=(index * 2654435761) % (1 << 128) + 1))
        stamp = created.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        yield {
            "id": recording_id,
            "source": "call",
            "sourceId": str(uuid.UUID(int=index + 7)),
            "channelId": "5a9e1c43-0000-4000-8000-00000000c0de",
            "status": STATUSES[index % len(STATUSES)],
            "direction": "incoming" if index % 2 else "outgoing",
            "originator": {
                "contact": {
                    "id": f"c-{index % 5000}",
                    "identifierKey": "phonenumber",
                    "identifierValue": f"+316{index % 100000000:08d}",
                },
                "number": {
                    "type": "pstn",
                    "number": f"+316{index % 100000000:08d}",
                    "anonymous": index % 17 == 0,
                    "callerIdName": f"Caller {index}",
                    "identity": "verified",
                    "countryIsoCode": "NL",
                },
            },
            "receiver": {
                "contact": {
                    "id": "desk",
                    "identifierKey": "phonenumber",
                    "identifierValue": "+31201234567",
                },
                "number": {
                    "type": "pstn",
                    "number": "+31201234567",
                    "anonymous": False,
                    "callerIdName": "Support",
                    "identity": None,
                    "countryIsoCode": "NL",
                },
            },
            "origin": "call-command-record",
            "duration": 5 + index % 900,
            "stereo": index % 3 == 0,
            "format": "mp3",
            "transcription": index % 4 == 0,
            "conferenceId": None,
            "url": f"https://media.api.bird.com/rec/{recording_id}.mp3?X-Amz-Signature={index:x}",
            "roomInfoUrl": None,
            "createdAt": stamp,
            "updatedAt": stamp,
            "endedAt": "0001-01-01T00:00:00Z" if index % 10 == 0 else stamp,
            "startedAt": stamp,
        }


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_pipeline(url: str, count: int, root: str) -> dict[str, float]:
    from recarchive.export.parquet import export_changed
    from recarchive.normalize import normalize_recording
    from recarchive.store.archive import ArchiveStore
    from recarchive.store.engine import create_engine_for, upgrade_database

    engine = create_engine_for(url)
    upgrade_database(engine)
    store = ArchiveStore(engine)
    fetched = datetime.now(UTC)
    rss_at_start = _rss_mb()
    started = time.perf_counter()
    chunk: list[Any] = []
    normalize_seconds = 0.0
    for payload in payloads(count):
        t = time.perf_counter()
        chunk.append(normalize_recording(payload, workspace_id="ws-bench", fetched_at=fetched))
        normalize_seconds += time.perf_counter() - t
        if len(chunk) == CHUNK:
            store.register([record.id for record in chunk])
            store.save_metadata(chunk)
            chunk = []
    if chunk:
        store.register([record.id for record in chunk])
        store.save_metadata(chunk)
    stored = time.perf_counter()
    report = export_changed(engine, root)
    done = time.perf_counter()
    # A second store of the same data must change nothing (and is cheap).
    t = time.perf_counter()
    again = itertools.islice(payloads(count), 10_000)
    while batch := list(itertools.islice(again, CHUNK)):
        store.save_metadata(
            [normalize_recording(p, workspace_id="ws-bench", fetched_at=fetched) for p in batch]
        )
    second = export_changed(engine, root)
    idle = time.perf_counter() - t
    engine.dispose()
    assert report.rows == count, report
    assert second.partitions == [], second
    return {
        "seconds": done - started,
        "normalize_seconds": normalize_seconds,
        "store_seconds": stored - started - normalize_seconds,
        "export_seconds": done - stored,
        "partitions": len(report.partitions),
        "rerun_10k_seconds": idle,
        "rss_mb": _rss_mb(),
        "rss_at_start_mb": rss_at_start,
    }


#: The ``recordings`` columns the baseline inserts: the same row the store writes.
BASELINE_COLUMNS = [*RECORDING_FIELDS, "created_month", "fetched_at", "raw_json"]


def _baseline_row(p: dict[str, Any], fetched: str) -> tuple[Any, ...]:
    return (
        p["id"],
        "ws-bench",
        p["source"],
        p["sourceId"],
        p["channelId"],
        p["status"],
        p["direction"],
        p["origin"],
        p["duration"],
        p["stereo"],
        p["format"],
        p["transcription"],
        p["conferenceId"],
        p["url"],
        p["roomInfoUrl"],
        p["createdAt"],
        p["updatedAt"],
        p["endedAt"],
        p["startedAt"],
        p["createdAt"][:7],
        fetched,
        json.dumps(p),
    )


def run_baseline(url: str, count: int) -> dict[str, float]:
    columns = ", ".join(f"{name} TEXT" for name in BASELINE_COLUMNS).replace(
        "id TEXT", "id TEXT PRIMARY KEY", 1
    )
    marks = ", ".join(["?"] * len(BASELINE_COLUMNS))
    fetched = datetime.now(UTC).isoformat()
    connection: Any
    if url.startswith("sqlite"):
        import sqlite3

        connection = sqlite3.connect(url.removeprefix("sqlite:///"))
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
    else:
        import psycopg

        connection = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"))
        marks = marks.replace("?", "%s")
    connection.execute(f"CREATE TABLE baseline ({columns})")
    connection.commit()
    sql = f"INSERT INTO baseline VALUES ({marks})"

    def flush(rows: list[tuple[Any, ...]]) -> None:
        cursor = connection.cursor()
        cursor.executemany(sql, rows)
        cursor.close()
        connection.commit()

    started = time.perf_counter()
    rows: list[tuple[Any, ...]] = []
    for payload in payloads(count):
        rows.append(_baseline_row(payload, fetched))
        if len(rows) == CHUNK:
            flush(rows)
            rows = []
    if rows:
        flush(rows)
    seconds = time.perf_counter() - started
    connection.close()
    return {"seconds": seconds, "rss_mb": _rss_mb()}


def in_child(function: Any, *args: Any) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return dict(pool.apply(function, args))


def bench_backend(name: str, pipeline_url: str, baseline_url: str, count: int) -> None:
    root = tempfile.mkdtemp(prefix="recarchive-bench-parquet-")
    try:
        base = in_child(run_baseline, baseline_url, count)
        result = in_child(run_pipeline, pipeline_url, count, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rate = count / result["seconds"]
    base_rate = count / base["seconds"]
    print(f"\n== {name}: {count:,} recordings ==")
    print(
        f"pipeline (normalize + upsert + parties + ledger register + export): "
        f"{result['seconds']:.2f}s = {rate:,.0f} recordings/s, "
        f"peak RSS {result['rss_mb']:.0f} MB ({result['rss_at_start_mb']:.0f} MB after imports)"
    )
    print(
        f"  normalize {result['normalize_seconds']:.2f}s, SQL {result['store_seconds']:.2f}s, "
        f"Parquet export {result['export_seconds']:.2f}s ({result['partitions']:.0f} partitions)"
    )
    print(
        f"  re-store of 10k identical payloads + export: {result['rerun_10k_seconds']:.2f}s "
        f"(no rows changed, no partitions written)"
    )
    print(
        f"baseline (bare executemany INSERT of the same rows): {base['seconds']:.2f}s = "
        f"{base_rate:,.0f} rows/s, peak RSS {base['rss_mb']:.0f} MB"
    )
    print(f"ratio pipeline/baseline throughput: {rate / base_rate:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument(
        "--postgres",
        default="auto",
        help="PostgreSQL URL; 'auto' starts a throwaway server; 'none' skips",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recarchive-bench-"))
    try:
        bench_backend(
            "SQLite",
            f"sqlite:///{work / 'pipeline.db'}",
            f"sqlite:///{work / 'baseline.db'}",
            args.count,
        )
        if args.postgres == "none":
            return
        from tests.fixtures.postgres import fresh_postgres_database

        with (
            postgres_server(args.postgres) as url,
            fresh_postgres_database(url) as pipeline_url,
            fresh_postgres_database(url) as baseline_url,
        ):
            bench_backend("PostgreSQL", pipeline_url, baseline_url, args.count)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
