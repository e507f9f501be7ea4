"""Backfill throughput of a real Prefect deployment with 1, 2 and 4 children workers.

Run: ``.venv/bin/python -m bench.scale_out [--recordings 1600] [--latency 0.05]
[--rate-limit 60] [--workers 1,2,4] [--children 4] [--concurrency 2]``.

The harness of ``tests/test_scale_out.py`` (:mod:`tests.fixtures.prefect_deployment`): one
``prefect server start`` on PostgreSQL with ``prefect.yaml``'s deployments, then for each
worker count a fresh ledger database (PostgreSQL), a fresh bucket (moto), a fresh simulator
(own process: latency L per API request, 429s beyond R requests/s, ``RECARCHIVE_REQUESTS_PER_
SECOND`` = R shared by every run through the ledger), N workers on the ``children`` queue with
``--limit 1`` plus one on ``default`` for the parent, and one ``backfill`` fanned out to
``--children`` children. Each child keeps few items in flight (``--concurrency``, one chunk at
a time), so that one child is bound by the latency, not by R: throughput should rise with the
workers until the shared limit R caps it. Figures, against the 1-worker baseline of the same
run: recordings/s over the parent's run and over the children's span (first child's start to
last child's end: without the parent's own start-up), the ratio to the baseline, the
simulator's peak API requests/s, its share of 429s (target < 1 %), and the API requests per
second it saw over its busy span (first API request to last, every gap included) as a share of
R: with enough items in flight that one child alone asks for more than R (``--concurrency
16``), that share is what the shared limiter lets the deployment achieve (target >= 0.9).
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.fixtures.postgres import PostgresServer, find_pg_bin, fresh_postgres_database
from tests.fixtures.prefect_deployment import (
    PrefectStack,
    RecarchiveEnv,
    SimulatorOptions,
    expected_states,
    ledger_states,
    prefect_stack,
    prepare_ledger,
    read_children,
    run_backfill,
    simulator_process,
    workers,
    write_id_manifest,
)
from tests.fixtures.s3 import AWS_ENV, running_moto_server

from recarchive.media.s3client import build_s3_client

_buckets = itertools.count()


@dataclass(frozen=True)
class Figures:
    workers: int
    children: int
    parent_seconds: float
    children_seconds: float
    recordings: int
    api_requests: int
    rate_limited: int
    peak: int
    per_second: dict[int, int]
    by_worker: dict[str, int]

    @property
    def busy_seconds(self) -> int:
        """Seconds from the simulator's first API request to its last, both included."""
        return max(self.per_second) - min(self.per_second) + 1

    @property
    def achieved_rate(self) -> float:
        """API requests per second over the busy span: every gap and the ramp count against it."""
        return sum(self.per_second.values()) / self.busy_seconds

    @property
    def throughput(self) -> float:
        return self.recordings / self.parent_seconds

    @property
    def children_throughput(self) -> float:
        return self.recordings / self.children_seconds


def measure(
    count: int,
    *,
    stack: PrefectStack,
    postgres_url: str,
    s3_endpoint: str,
    options: SimulatorOptions,
    args: argparse.Namespace,
    folder: Path,
) -> Figures:
    """One backfill of every simulator ID with ``count`` children workers."""
    bucket = f"recarchive-bench-{next(_buckets)}"
    client = build_s3_client(
        endpoint_url=s3_endpoint, request_checksum_calculation="when_supported"
    )
    client.create_bucket(Bucket=bucket)
    run_folder = folder / f"workers-{count}"
    run_folder.mkdir()
    ids_file = run_folder / "ids.txt"
    ids = write_id_manifest(options, ids_file)
    chunk_size = -(-len(ids) // (args.children * args.chunks_per_child))
    with (
        fresh_postgres_database(postgres_url) as ledger_url,
        simulator_process(options, run_folder) as simulator,
    ):
        prepare_ledger(ledger_url)
        archive = RecarchiveEnv(
            ledger_url, s3_endpoint, bucket, simulator, concurrency=args.concurrency
        )
        with workers(stack, archive, children=count, tag=f"n{count}"):
            parent = run_backfill(
                stack,
                {
                    "ids_file": str(ids_file),
                    "fan_out": True,
                    "chunk_size": chunk_size,
                    "chunks_per_child": args.chunks_per_child,
                    "max_parallel_chunks": 1,
                },
                timeout=args.timeout,
            )
        stats = simulator.stats()
        states = ledger_states(ledger_url)
    children = read_children(stack, parent)
    if parent.state != "COMPLETED" or states != expected_states(options):
        raise SystemExit(f"{count} workers: parent {parent.state_name}, ledger not as expected")
    first = min(child.start_time for child in children)
    last = max(child.end_time for child in children)
    by_worker: dict[str, int] = {}
    for child in children:
        by_worker[str(child.worker)] = by_worker.get(str(child.worker), 0) + 1
    return Figures(
        workers=count,
        children=len(children),
        parent_seconds=(parent.end_time - parent.start_time).total_seconds(),
        children_seconds=(last - first).total_seconds(),
        recordings=len(ids),
        api_requests=stats["api"]["requests"],
        rate_limited=stats["api"]["rate_limited"],
        peak=stats["api"]["peak_per_second"],
        per_second={int(s): n for s, n in stats["api"]["per_second"].items()},
        by_worker=by_worker,
    )


def timeline(figures: Figures, step: int = 5) -> str:
    """The simulator's API requests in ``step``-second bins, first request to last."""
    first = min(figures.per_second)
    bins: dict[int, int] = {}
    for second, count in figures.per_second.items():
        bins[(second - first) // step] = bins.get((second - first) // step, 0) + count
    return " ".join(str(bins.get(index, 0)) for index in range(max(bins) + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recordings", type=int, default=1600)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--rate-limit", type=float, default=60.0)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--children", type=int, default=4, help="fan-out children per backfill")
    parser.add_argument("--chunks-per-child", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2, help="items in flight per chunk")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per backfill")
    args = parser.parse_args()
    # A plain `kill` unwinds the context managers too: no server or worker is left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # The bench process talks to moto too (buckets): the workers' dummy credentials, no others.
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        del os.environ[name]
    os.environ.update(AWS_ENV)
    options = SimulatorOptions(
        recordings=args.recordings,
        latency=args.latency,
        rate_limit=args.rate_limit,
        missing_fraction=0.02,
    )
    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise SystemExit("PostgreSQL binaries not found: ./scripts/bootstrap --postgres")
    batch = max(1, round(args.rate_limit / 10))
    print(
        f"{args.recordings} recordings, latency {args.latency} s, limit R = {args.rate_limit:g}/s "
        f"(batch {batch}), {args.children} children of {args.chunks_per_child} chunks, "
        f"concurrency {args.concurrency} x 1 chunk per child",
        flush=True,
    )
    server = PostgresServer(bin_dir)
    postgres_url = server.start()
    results: list[Figures] = []
    try:
        with (
            tempfile.TemporaryDirectory(prefix="recarchive-bench-") as work,
            running_moto_server() as s3_endpoint,
            fresh_postgres_database(postgres_url) as prefect_url,
            prefect_stack(prefect_url, Path(work)) as stack,
        ):
            for count in (int(n) for n in args.workers.split(",")):
                started = time.monotonic()
                figures = measure(
                    count,
                    stack=stack,
                    postgres_url=postgres_url,
                    s3_endpoint=s3_endpoint,
                    options=options,
                    args=args,
                    folder=Path(work),
                )
                results.append(figures)
                base = results[0]
                print(
                    f"{count} worker(s): {figures.throughput:.1f} recordings/s over the parent "
                    f"({figures.parent_seconds:.1f} s; x{figures.throughput / base.throughput:.2f}"
                    f" of 1 worker), {figures.children_throughput:.1f}/s over the children "
                    f"({figures.children_seconds:.1f} s; "
                    f"x{figures.children_throughput / base.children_throughput:.2f}); "
                    f"{figures.children} children {figures.by_worker}; peak "
                    f"{figures.peak} API req/s (R {args.rate_limit:g} + {batch}); "
                    f"{figures.rate_limited} 429s of {figures.api_requests} "
                    f"({100 * figures.rate_limited / figures.api_requests:.2f} %); "
                    f"{figures.achieved_rate:.1f} API req/s over the simulator's busy "
                    f"{figures.busy_seconds} s (x{figures.achieved_rate / args.rate_limit:.2f} "
                    f"of R); "
                    f"{time.monotonic() - started:.0f} s with set-up",
                    flush=True,
                )
                print(f"  API requests per 5 s over the busy span: {timeline(figures)}", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
