"""Benchmark: ``recarchive export --full`` of N recordings over 90 days, against a bare export.

Run:  .venv/bin/python -m bench.export_full [--count 100000] [--repeat 3]
          [--postgres URL|auto|none] [--sqlite/--no-sqlite]

A database is filled directly (Core ``executemany`` through the project's tables, so values
are stored exactly as the store stores them) with N recordings spread evenly over 90 days, two
parties each and a ledger row each (80 % archived with media columns, 15 % ``metadata_only``,
5 % ``failed``), and every month marked changed. Then, each in its own child process, timed from
spawn to exit with its peak RSS (``wait4``):

The machine may be shared: the wall time of a child and its CPU time (user + sys) are both
printed; under contention the CPU time is the steadier figure.

- ``recarchive export --full`` into an empty root (``--repeat`` times, root removed between);
- ``recarchive export --full`` again with nothing changed, and plain ``recarchive export``:
  how many partition files each replaced (a file counts as written if its inode changed);
- ``recarchive export --full`` with ``RECARCHIVE_PARQUET_PII=hash`` into an empty root of its
  own, alternating with the raw one (``--repeat`` times): the cost of hashing the callers'
  columns; then a plain export that switches the raw root to ``hash`` (every file replaced)
  and one more with nothing changed (none);
- the baseline: a bare DB-API ``SELECT`` of the same rows (the export's own SQL text) →
  ``pa.array`` per column (types inferred) → ``pq.write_table`` (zstd), per month and table;
  no type conversion, no media columns worked out, no temp file, lock or partition marks.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.postgres import postgres_server

CHUNK = 20_000
DAYS = 90
BASE = datetime(2026, 9, 1, tzinfo=UTC)
#: RECARCHIVE_PII_KEY of the hash runs (a benchmark's, not a secret).
PII_KEY = "bench-pii-key-0123456789abcdef0123456789"
STATUSES = ["available"] * 6 + ["completed", "accepted", "ongoing", "paused"]


def _rows(count: int, start: int, stop: int) -> Iterator[tuple[dict[str, Any], ...]]:
    """Rows of recordings ``start..stop``: (recording, originator, receiver, ledger)."""
    step = DAYS * 86400 / max(count, 1)
    fetched = datetime(2026, 12, 1, tzinfo=UTC)
    for index in range(start, stop):
        created = BASE + timedelta(seconds=index * step)
        recording_id = str(uuid.UUID(int=(index * 2654435761) % (1 << 128) + 1))
        number = f"+316{index % 100000000:08d}"
        recording = {
            "id": recording_id,
            "workspace_id": "ws-bench",
            "source": "call",
            "source_id": str(uuid.UUID(int=index + 7)),
            "channel_id": "5a9e1c43-0000-4000-8000-00000000c0de",
            "status": STATUSES[index % len(STATUSES)],
            "direction": "incoming" if index % 2 else "outgoing",
            "origin": "call-command-record",
            "duration": float(5 + index % 900),
            "stereo": index % 3 == 0,
            "format": "mp3",
            "transcription": index % 4 == 0,
            "conference_id": None,
            "url": f"https://media.api.bird.com/rec/{recording_id}.mp3",
            "room_info_url": None,
            "created_at": created,
            "updated_at": created,
            "ended_at": None if index % 10 == 0 else created + timedelta(seconds=60),
            "started_at": created,
            "created_month": created.strftime("%Y-%m"),
            "fetched_at": fetched,
            # About the size of a real redacted payload's JSON.
            "raw_json": f'{{"id": "{recording_id}", "padding": "{"x" * 900}"}}',
        }
        originator = {
            "recording_id": recording_id,
            "role": "originator",
            "contact_id": f"c-{index % 5000}",
            "contact_identifier_key": "phonenumber",
            "contact_identifier_value": number,
            "number_type": "pstn",
            "number": number,
            "number_anonymous": index % 17 == 0,
            "number_caller_id_name": f"Caller {index}",
            "number_identity": "verified",
            "number_country_iso_code": "NL",
        }
        receiver = {
            **originator,
            "role": "receiver",
            "contact_id": "desk",
            "contact_identifier_value": "+31201234567",
            "number": "+31201234567",
            "number_anonymous": False,
            "number_caller_id_name": "Support",
            "number_identity": None,
        }
        kind = index % 20
        state = "archived" if kind < 16 else "metadata_only" if kind < 19 else "failed"
        archived = state == "archived"
        ledger = {
            "recording_id": recording_id,
            "state": state,
            "attempts": 1,
            "last_error": "media not ready" if state == "failed" else None,
            "next_attempt_at": None,
            "s3_bucket": "bench-bucket",
            "s3_key": f"ws-bench/{created:%Y/%m/%d}/{recording_id}.mp3",
            "size_bytes": 40_000 + index % 100_000 if archived else None,
            "sha256": f"{index:064x}" if archived else None,
            "archived_at": fetched if archived else None,
            "lease_owner": None,
            "lease_expires_at": None,
            "created_at": fetched,
            "updated_at": fetched,
            "registered_run": None,
        }
        yield recording, originator, receiver, ledger


def fill(url: str, count: int) -> list[str]:
    """Create the schema and fill it; return the months."""
    from recarchive.store.engine import create_engine_for, upgrade_database
    from recarchive.store.partitions import mark_partitions
    from recarchive.store.tables import archive_ledger, recording_parties, recordings

    engine = create_engine_for(url)
    upgrade_database(engine)
    months: set[str] = set()
    for start in range(0, count, CHUNK):
        batch = list(_rows(count, start, min(count, start + CHUNK)))
        months.update(row[0]["created_month"] for row in batch)
        with engine.begin() as connection:
            connection.execute(recordings.insert(), [row[0] for row in batch])
            connection.execute(
                recording_parties.insert(), [party for row in batch for party in row[1:3]]
            )
            connection.execute(archive_ledger.insert(), [row[3] for row in batch])
    with engine.begin() as connection:
        mark_partitions(connection, months)
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("VACUUM ANALYZE")
    engine.dispose()
    return sorted(months)


def _months(url: str) -> list[str]:
    """The months of an already filled database."""
    from sqlalchemy import create_engine, select

    from recarchive.store.tables import recordings

    engine = create_engine(url)
    with engine.connect() as connection:
        months = connection.execute(select(recordings.c.created_month).distinct()).scalars()
        found = sorted(months)
    engine.dispose()
    return found


def export_sql(url: str) -> tuple[str, str]:
    """The export's own SQL text, recordings and parties, with the month as ``'MONTH'``."""
    from sqlalchemy import create_engine

    from recarchive.export.rows import parties_query, recordings_query

    dialect = create_engine(url).dialect
    texts = []
    for query in (recordings_query("MONTH"), parties_query("MONTH")):
        compiled = query.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
        texts.append(str(compiled))
    return texts[0], texts[1]


# --- the baseline child (python -c) --------------------------------------------------------

BASELINE = r"""
import sys, time, pyarrow as pa, pyarrow.parquet as pq
url, root, recordings_sql, parties_sql, *months = sys.argv[1:]
if url.startswith("sqlite"):
    import sqlite3
    connection = sqlite3.connect(url.removeprefix("sqlite:///"))
else:
    import psycopg
    connection = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"))
rows_out = 0
for month in months:
    for table, sql in (("recordings", recordings_sql), ("recording_parties", parties_sql)):
        cursor = connection.cursor()
        cursor.execute(sql.replace("'MONTH'", f"'{month}'"))
        names = [item[0] for item in cursor.description]
        rows = cursor.fetchall()
        columns = list(zip(*rows))
        frame = pa.table([pa.array(c) for c in columns], names=names)
        folder = f"{root}/{table}/created_month={month}"
        import os; os.makedirs(folder, exist_ok=True)
        pq.write_table(frame, f"{folder}/part-0.parquet", compression="zstd", row_group_size=131072)
        rows_out += len(rows) if table == "recordings" else 0
print(f"exported {rows_out} rows")
"""


def _child(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    started = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    out = process.stdout.read().decode() if process.stdout else ""
    err = process.stderr.read().decode() if process.stderr else ""
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{argv[:3]} failed ({process.returncode}):\n{out}\n{err}")
    cpu = usage.ru_utime + usage.ru_stime
    return {"seconds": seconds, "cpu": cpu, "rss_mb": usage.ru_maxrss / 1024, "out": out.strip()}


def _listed(values: list[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in values)


def _inodes(root: Path) -> dict[str, int]:
    return {str(path): path.stat().st_ino for path in root.rglob("*.parquet")}


def bench_backend(name: str, url: str, count: int, repeat: int, fill_first: bool = True) -> None:
    work = Path(tempfile.mkdtemp(prefix="recarchive-bench-export-"))
    try:
        t = time.perf_counter()
        months = fill(url, count) if fill_first else _months(url)
        print(f"\n== {name}: {count:,} recordings over {DAYS} days, {len(months)} partitions ==")
        print(f"fill: {time.perf_counter() - t:.1f}s" if fill_first else "fill: reused")
        env = {
            **os.environ,
            "RECARCHIVE_DATABASE_URL": url,
            "RECARCHIVE_PARQUET_ROOT": str(work / "parquet"),
        }
        cli = [str(Path(sys.executable).parent / "recarchive")]
        recordings_sql, parties_sql = export_sql(url)
        baseline_argv = [
            sys.executable,
            "-c",
            BASELINE,
            url,
            str(work / "baseline"),
            recordings_sql,
            parties_sql,
            *months,
        ]
        hash_env = {
            **env,
            "RECARCHIVE_PARQUET_PII": "hash",
            "RECARCHIVE_PII_KEY": PII_KEY,
            "RECARCHIVE_PARQUET_ROOT": str(work / "parquet-hash"),
        }
        full, base, hashed = [], [], []
        for _ in range(repeat):
            for folder in ("parquet", "baseline", "parquet-hash"):
                shutil.rmtree(work / folder, ignore_errors=True)
            base.append(_child(baseline_argv, env))
            full.append(_child([*cli, "export", "--full"], env))
            hashed.append(_child([*cli, "export", "--full"], hash_env))
        before = _inodes(work / "parquet")
        again = _child([*cli, "export", "--full"], env)
        after_full = _inodes(work / "parquet")
        plain = _child([*cli, "export"], env)
        after_plain = _inodes(work / "parquet")
        written_full = sum(after_full.get(k) != v for k, v in before.items())
        written_plain = sum(after_plain.get(k) != v for k, v in after_full.items())
        # The raw root switched to hash by a plain export, then one more with nothing changed.
        switch_env = {**hash_env, "RECARCHIVE_PARQUET_ROOT": str(work / "parquet")}
        switched = _child([*cli, "export"], switch_env)
        after_switch = _inodes(work / "parquet")
        settled = _child([*cli, "export"], switch_env)
        written_switch = sum(after_switch.get(k) != v for k, v in after_plain.items())
        settled_inodes = _inodes(work / "parquet")
        written_settled = sum(settled_inodes.get(k) != v for k, v in after_switch.items())
        sizes = sum(Path(p).stat().st_size for p in before) / 1e6

        def line(label: str, runs: list[dict[str, Any]]) -> float:
            seconds = [r["seconds"] for r in runs]
            cpu = [r["cpu"] for r in runs]
            rss = max(r["rss_mb"] for r in runs)
            median = statistics.median(seconds)
            cpu_median = float(statistics.median(cpu))
            print(
                f"{label}: wall median {median:.2f}s (runs {_listed(seconds)}),"
                f" CPU median {cpu_median:.2f}s (runs {_listed(cpu)}), peak RSS {rss:.0f} MB"
            )
            return cpu_median

        print(f"  CLI says: {full[-1]['out']}")
        full_s = line("export --full (empty root), whole process", full)
        base_s = line("baseline bare SELECT -> pa.array -> write_table, whole process", base)
        print(f"ratio baseline/export CPU: {base_s / full_s:.2f}   ({sizes:.1f} MB of Parquet)")
        hash_s = line("export --full, RECARCHIVE_PARQUET_PII=hash, whole process", hashed)
        print(f"ratio hash/raw export CPU: {hash_s / full_s:.2f}")
        print(
            f"export --full again, nothing changed: {again['seconds']:.2f}s wall, "
            f"{again['cpu']:.2f}s CPU, peak RSS {again['rss_mb']:.0f} MB, "
            f"{written_full} of {len(before)} files replaced  ({again['out']})"
        )
        print(
            f"export (plain) again, nothing changed: {plain['seconds']:.2f}s wall, "
            f"{plain['cpu']:.2f}s CPU, "
            f"{written_plain} of {len(before)} files replaced  ({plain['out']})"
        )
        print(
            f"export (plain), raw -> hash: {switched['seconds']:.2f}s wall, "
            f"{switched['cpu']:.2f}s CPU, {written_switch} of {len(before)} files replaced; "
            f"again, nothing changed: {settled['seconds']:.2f}s wall, "
            f"{written_settled} of {len(before)} files replaced"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sqlite", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--keep-db",
        type=Path,
        help="SQLite file to fill and keep, or reuse if it exists (filled with the same --count)",
    )
    parser.add_argument(
        "--postgres",
        default="auto",
        help="PostgreSQL URL; 'auto' starts a throwaway server; 'none' skips",
    )
    args = parser.parse_args()
    if args.sqlite and args.keep_db:
        url = f"sqlite:///{args.keep_db}"
        bench_backend("SQLite", url, args.count, args.repeat, fill_first=not args.keep_db.exists())
    elif args.sqlite:
        work = Path(tempfile.mkdtemp(prefix="recarchive-bench-db-"))
        try:
            bench_backend("SQLite", f"sqlite:///{work / 'bench.db'}", args.count, args.repeat)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if args.postgres == "none":
        return
    from tests.fixtures.postgres import fresh_postgres_database

    with (
        postgres_server(args.postgres) as url,
        fresh_postgres_database(url) as database_url,
    ):
        bench_backend("PostgreSQL", database_url, args.count, args.repeat)


if __name__ == "__main__":
    main()
