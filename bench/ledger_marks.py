"""Benchmark: ``recarchive archive --skip-media`` on simulator IDs, marks batched vs per item.

Run:  .venv/bin/python -m bench.ledger_marks [--count 10000] [--repeat 3] [--base main]
      [--postgres auto|URL|none]

Each run is the real console script in a fresh database (SQLite file, or a fresh PostgreSQL
database), against one ``recarchive simulate`` process, pacing lifted
(``RECARCHIVE_REQUESTS_PER_SECOND=100000``), default concurrency and chunk size. The
baseline is the code of ``--base`` (``git archive`` of its ``src/``, put first on
``PYTHONPATH``), run the same way in the same invocation; runs alternate between the two.

Figures per run: recordings/s over the whole process (imports and the export included), and
over the run's own ``runs`` row (``started_at`` to ``finished_at``: registration, chunks and
export); SQL statements sent and commits, counted by SQLAlchemy engine events in the child (an
``executemany`` counts once), in total and per chunk.

Then the marks alone, without HTTP (``--marks`` of them, in a child process each, on stored
and leased recordings): the baseline's ``mark_metadata_only`` per recording, this code's
``mark_metadata_only`` (a batch of one), and the baseline's and this code's
``apply_outcomes`` in batches of :data:`~recarchive.run.marks.MAX_PENDING` (the baseline must
have it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.postgres import postgres_server
from bench.sim_process import SimulatorProcess, simulator_process

ROOT = Path(__file__).resolve().parents[1]
RECARCHIVE = str(Path(sys.executable).with_name("recarchive"))
CHUNK = 500

#: The child: the console script with SQLAlchemy's engine events counting statements and
#: commits, written as JSON to the file named by RECARCHIVE_BENCH_SQL_COUNTS at exit.
COUNTING_CHILD = """
import atexit, json, os, sys
from sqlalchemy import event
from sqlalchemy.engine import Engine

counts = {"statements": 0, "commits": 0}

def on_execute(*_):
    counts["statements"] += 1

def on_commit(*_):
    counts["commits"] += 1

event.listen(Engine, "before_cursor_execute", on_execute)
event.listen(Engine, "commit", on_commit)

def write():
    with open(os.environ["RECARCHIVE_BENCH_SQL_COUNTS"], "w") as handle:
        json.dump(counts, handle)

atexit.register(write)
import recarchive.cli.app
sys.argv[0] = "recarchive"
recarchive.cli.app.main()
"""


MARKS_CHILD = """
import json, sys, time
from datetime import UTC, datetime
from bench.normalize_store import payloads
from recarchive.normalize import normalize_recording
from recarchive.store.archive import ArchiveStore
from recarchive.store.engine import create_engine_for, upgrade_database

url, count, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
engine = create_engine_for(url)
upgrade_database(engine)
store = ArchiveStore(engine)
now = datetime.now(UTC)
records = [normalize_recording(p, workspace_id="ws", fetched_at=now) for p in payloads(count)]
ids = [record.id for record in records]
store.register(ids)
for start in range(0, count, 500):
    store.save_metadata(records[start : start + 500])
    store.claim(ids[start : start + 500], owner="bench", lease_seconds=900, states={"pending"})
started = time.perf_counter()
if mode == "single":
    for recording_id in ids:
        store.mark_metadata_only(recording_id, owner="bench", reason="skip-media")
else:
    from recarchive.run.marks import MAX_PENDING
    from recarchive.store.outcomes import Outcome

    for start in range(0, count, MAX_PENDING):
        step = ids[start : start + MAX_PENDING]
        batch = [Outcome.metadata_only(i, reason="skip-media") for i in step]
        assert store.apply_outcomes(batch, owner="bench") == {}
seconds = time.perf_counter() - started
assert store.counts()["metadata_only"] == count
print(json.dumps({"seconds": seconds}))
"""


def marks_alone(database_url: str, count: int, mode: str, pythonpath: str | None) -> float:
    """Seconds to mark ``count`` stored, leased recordings ``metadata_only``."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run(
        [sys.executable, "-c", MARKS_CHILD, database_url, str(count), mode],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"marks child failed: {done.stderr[-2000:]}")
    return float(json.loads(done.stdout.splitlines()[-1])["seconds"])


def simulator_ids(count: int, seed: int) -> list[str]:
    """The IDs of ``recarchive simulate --recordings count --seed seed`` (missing ones too)."""
    listed = subprocess.run(
        [RECARCHIVE, "simulate", "--list-ids", "--recordings", str(count), "--seed", str(seed)],
        check=True,
        capture_output=True,
        text=True,
    )
    return listed.stdout.split()


def run_once(
    sim: SimulatorProcess, ids_file: Path, database_url: str, work: Path, pythonpath: str | None
) -> dict[str, Any]:
    """One ``archive --skip-media`` run; its wall time, run-row time and SQL counts."""
    work = Path(tempfile.mkdtemp(dir=work))  # this run's own Parquet root and temp folder
    counts_file = work / "sql.json"
    env = {
        **{name: value for name, value in os.environ.items() if not name.startswith("RECARCHIVE_")},
        "RECARCHIVE_BIRD_API_URL": sim.api_url,
        "RECARCHIVE_BIRD_ACCESS_KEY": sim.access_key,
        "RECARCHIVE_WORKSPACE_ID": sim.workspace_id,
        "RECARCHIVE_DATABASE_URL": database_url,
        "RECARCHIVE_PARQUET_ROOT": str(work / "parquet"),
        "RECARCHIVE_PARQUET_PII": "raw",
        "RECARCHIVE_REQUESTS_PER_SECOND": "100000",
        "RECARCHIVE_TEMP_DIR": str(work),
        "RECARCHIVE_BENCH_SQL_COUNTS": str(counts_file),
    }
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    command = [sys.executable, "-c", COUNTING_CHILD, "archive", "--skip-media"]
    started = time.perf_counter()
    done = subprocess.run(
        [*command, "--ids-file", str(ids_file)],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if done.returncode not in (0, 1):  # 1: some IDs are missing at the simulator
        raise RuntimeError(f"archive failed ({done.returncode}): {done.stderr[-2000:]}")
    return {"wall": wall, "run": run_seconds(database_url), **json.loads(counts_file.read_text())}


def run_seconds(database_url: str) -> float:
    """``finished_at - started_at`` of the only ``runs`` row."""
    from sqlalchemy import select

    from recarchive.store.engine import create_engine_for
    from recarchive.store.tables import runs

    engine = create_engine_for(database_url)
    try:
        with engine.connect() as connection:
            started, finished = connection.execute(
                select(runs.c.started_at, runs.c.finished_at)
            ).one()
        return float((finished - started).total_seconds())
    finally:
        engine.dispose()


@contextmanager
def baseline_source(ref: str) -> Iterator[str]:
    """``src/`` of git ``ref`` in a temp folder (for ``PYTHONPATH``)."""
    folder = Path(tempfile.mkdtemp(prefix="recarchive-base-"))
    try:
        archive = subprocess.run(
            ["git", "archive", ref, "src"], cwd=ROOT, check=True, capture_output=True
        )
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
        yield str(folder / "src")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def databases(backend: str, postgres: str, work: Path) -> Iterator[Iterator[str]]:
    """Fresh database URLs, one per call of ``next``."""
    if backend == "SQLite":

        def sqlite_urls() -> Iterator[str]:
            number = 0
            while True:
                number += 1
                yield f"sqlite:///{work / f'archive-{number}.db'}"

        yield sqlite_urls()
        return
    from tests.fixtures.postgres import fresh_postgres_database

    with postgres_server(postgres) as url:

        def postgres_urls() -> Generator[str, None, None]:
            while True:
                with fresh_postgres_database(url) as fresh:
                    yield fresh

        urls = postgres_urls()
        try:
            yield urls
        finally:
            urls.close()  # drops the last database while the server still runs


def report(backend: str, count: int, results: dict[str, list[dict[str, Any]]]) -> None:
    chunks = -(-count // CHUNK)
    print(f"\n== {backend}: archive --skip-media of {count:,} simulator IDs ({chunks} chunks) ==")
    print(
        f"  {'code':<9} {'rec/s whole':>20} {'rec/s run row':>20} "
        f"{'statements/chunk':>17} {'commits/chunk':>14}"
    )
    medians: dict[str, float] = {}
    for name, runs in results.items():
        whole = [count / r["wall"] for r in runs]
        row = [count / r["run"] for r in runs]
        medians[name] = statistics.median(whole)
        print(
            f"  {name:<9} {statistics.median(whole):>8.0f} ({min(whole):.0f}-{max(whole):.0f})"
            f"   {statistics.median(row):>8.0f} ({min(row):.0f}-{max(row):.0f})"
            f"   {runs[0]['statements'] / chunks:>14.1f} {runs[0]['commits'] / chunks:>14.1f}"
        )
    print(
        f"  ratio batched / baseline (median, whole process): "
        f"{medians['batched'] / medians['baseline']:.2f}"
    )


def report_marks(backend: str, count: int, repeat: int, base_src: str, urls: Iterator[str]) -> None:
    cases = [
        ("baseline, one transaction per mark", "single", base_src),
        ("batched code, one mark per call", "single", None),
        ("baseline, apply_outcomes per 64", "batch", base_src),
        ("this code, apply_outcomes per 64", "batch", None),
    ]
    seconds: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    for _ in range(repeat):
        for name, mode, path in cases:
            seconds[name].append(marks_alone(next(urls), count, mode, path))
    print(f"\n== {backend}: {count:,} marks alone (metadata_only), no HTTP ==")
    base = statistics.median(seconds[cases[0][0]])
    for name, runs in seconds.items():
        rates = [count / s for s in runs]
        print(
            f"  {name:<38} {statistics.median(rates):>8.0f} marks/s "
            f"({min(rates):.0f}-{max(rates):.0f}), {1000 * statistics.median(runs) / count:.3f} "
            f"ms/mark, {base / statistics.median(runs):.1f}x baseline"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--base", default="main", help="git ref of the baseline code")
    parser.add_argument("--postgres", default="auto", help="'auto', a server URL, or 'none'")
    parser.add_argument("--marks", type=int, default=10_000, help="marks alone (0: skip)")
    parser.add_argument("--skip-cli", action="store_true", help="the marks alone only")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recarchive-bench-"))
    backends = ["SQLite"] + ([] if args.postgres == "none" else ["PostgreSQL"])
    try:
        with baseline_source(args.base) as base_src:
            if not args.skip_cli:
                ids_file = work / "ids.txt"
                ids_file.write_text("\n".join(simulator_ids(args.count, args.seed)) + "\n")
                with simulator_process(recordings=args.count, seed=args.seed) as sim:
                    for backend in backends:
                        with databases(backend, args.postgres, work) as urls:
                            cli_runs(backend, args, sim, ids_file, base_src, urls, work)
            if args.marks:
                for backend in backends:
                    with databases(backend, args.postgres, work) as urls:
                        report_marks(backend, args.marks, args.repeat, base_src, urls)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cli_runs(
    backend: str,
    args: argparse.Namespace,
    sim: SimulatorProcess,
    ids_file: Path,
    base_src: str,
    urls: Iterator[str],
    work: Path,
) -> None:
    """``--repeat`` runs of each code, alternating, then their figures."""
    results: dict[str, list[dict[str, Any]]] = {"baseline": [], "batched": []}
    for _ in range(args.repeat):
        for name, path in (("baseline", base_src), ("batched", None)):
            result = run_once(sim, ids_file, next(urls), work, path)
            results[name].append(result)
            print(
                f"  {backend} {name}: {result['wall']:.1f} s whole, {result['run']:.1f} s run "
                f"row, {result['statements']} statements, {result['commits']} commits",
                flush=True,
            )
    report(backend, args.count, results)


if __name__ == "__main__":
    main()
