"""A 1M-ID backfill through the ``backfill`` flow: flat memory, one task run per chunk, CLI speed.

Run: ``.venv/bin/python -m bench.backfill_scale [--ids 1000000] [--chunk-size 500]
[--concurrency 32] [--parallel-chunks 2]`` (not in CI: about an hour at 1M on two cores).

One simulator (own process) with ``--ids`` recordings, no latency, no faults, its dataset
lazy (``simulate --lazy``: it starts in seconds and stays small); a manifest of every ID from
``simulate --list-ids --lazy``; a local Prefect test server (``prefect_test_harness``,
SQLite). Then, each in a process of its own, on a fresh SQLite ledger of its own, metadata only:

1. the baseline, ``recarchive archive --skip-media --ids-file MANIFEST`` (the CLI's in-process
   pacer);
2. the ``backfill`` flow without fan-out on the same manifest (its process started by this
   bench with ``PREFECT_API_URL`` set, so it reports to the test server), with the
   deployment's shared rate limiter (``RECARCHIVE_RATE_LIMIT_SHARED=true``, as ``prefect.yaml``
   sets it), its RSS sampled every ``--sample-seconds`` from ``/proc`` (the flow's process,
   not the Prefect server's), pandas unimportable in it as in a production install (it is a
   dev dependency; ``--dev-pandas`` lets the dev venv's pandas in);
3. ``recarchive export --full`` of the flow's database, timed, with its peak RSS.

Pacing is lifted (``RECARCHIVE_REQUESTS_PER_SECOND=100000``) in both runs. Prints the flow's
RSS samples (first and last quarter, peak; target flat and <= 300 MB), its task runs against
the number of chunks (target equal), the throughput of flow and CLI and their ratio (target
flow / CLI >= 0.9), and the export's seconds and peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.abc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MB = 1024 * 1024


@dataclass(frozen=True)
class Measured:
    """One child process: its wall time, peak RSS (``wait4``) and RSS samples."""

    seconds: float
    peak_mb: float
    samples_mb: list[float]
    output: str


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def measure(command: list[str], env: dict[str, str], *, sample_seconds: float) -> Measured:
    """Run ``command``; sample its RSS every ``sample_seconds``; fail loudly if it fails."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        samples: list[float] = []
        next_sample = started
        while True:
            # wait4 reaps the child and hands back its own rusage (peak RSS included).
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() >= next_sample:
                next_sample += sample_seconds
                rss = _rss_mb(process.pid)
                if rss is not None:
                    samples.append(rss)
            time.sleep(0.1)
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        out.seek(0)
        text = out.read().decode(errors="replace")
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed:\n{text[-3000:]}")
    return Measured(seconds, usage.ru_maxrss / 1024, samples, text)


class _NoPandas(importlib.abc.MetaPathFinder):
    """``import pandas`` fails, as in a production install (pandas is a dev dependency only)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        if fullname == "pandas" or fullname.startswith("pandas."):
            raise ImportError("pandas is not installed in production (bench.backfill_scale)")


def run_flow(manifest: str, parallel: int, *, dev_pandas: bool) -> None:
    """Child mode: the ``backfill`` flow on ``manifest``, metadata only; print what it did.

    Unless ``dev_pandas``, pandas cannot be imported in this process, as in an installation
    without the dev dependencies (``uv tree --no-dev`` has no pandas): in the dev venv pyarrow
    imports it at the export's first conversion (+93 MB, docs/benchmarks.md), which a
    deployment's flow process never does.
    """
    if not dev_pandas:
        sys.meta_path.insert(0, _NoPandas())
    # As in a worker's flow process, flows/ is imported before pyarrow is (it chooses Arrow's
    # allocator then); nothing of the bench's own imports pyarrow in this mode.
    import httpx
    from flows.backfill import backfill
    from prefect.settings import PREFECT_API_URL

    async def flow() -> Any:
        return await backfill(
            ids_file=manifest, skip_media=True, max_parallel_chunks=parallel, return_state=True
        )

    state = asyncio.run(flow())
    import pyarrow as pa

    flow_run_id = str(state.state_details.flow_run_id)
    # The API's own count of this flow run's task runs (POST /task_runs/count).
    answer = httpx.post(
        f"{PREFECT_API_URL.value()}/task_runs/count",
        json={"flow_runs": {"id": {"any_": [flow_run_id]}}},
        timeout=60,
    )
    answer.raise_for_status()
    print(
        "RESULT "
        + json.dumps(
            {
                "state": state.name,
                "counts": state.result(raise_on_failure=False),
                "task_runs": answer.json(),
                "pandas_imported": "pandas" in sys.modules,
                "arrow_pool": pa.default_memory_pool().backend_name,
            },
            default=str,
        ),
        flush=True,
    )


def _env(
    folder: Path, simulator_url: str, access_key: str, workspace: str, args: argparse.Namespace
) -> dict[str, str]:
    # The child's environment: this one without any RECARCHIVE_ or AWS_ setting of the caller,
    # and bench.flow_overhead's (SQLite in ``folder``, pacing lifted).
    from bench.flow_overhead import _env as overhead_env

    base = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("RECARCHIVE_", "AWS_", "ARROW_"))
    }
    return {**base, **overhead_env(simulator_url, workspace, access_key, folder, args)}


def _quarters(samples: list[float]) -> tuple[float, float]:
    quarter = max(1, len(samples) // 4)
    return statistics.mean(samples[:quarter]), statistics.mean(samples[-quarter:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ids", type=int, default=1_000_000)
    parser.add_argument("--chunk-size", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--parallel-chunks", type=int, default=2)
    parser.add_argument("--sample-seconds", type=float, default=10.0)
    parser.add_argument(
        "--dev-pandas",
        action="store_true",
        help="let the flow's process import pandas, as the dev venv allows (off: as in production)",
    )
    parser.add_argument("--run-flow", metavar="MANIFEST", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # A plain `kill` unwinds the context managers too: no server or worker is left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.run_flow:
        run_flow(args.run_flow, args.parallel_chunks, dev_pandas=args.dev_pandas)
        return

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness
    from tests.fixtures.prefect_deployment import (
        BIN,
        SimulatorOptions,
        simulator_process,
        write_id_manifest,
    )

    options = SimulatorOptions(
        recordings=args.ids, seed=21, latency=0.0, rate_limit=1e9, missing_fraction=0.0, lazy=True
    )
    with tempfile.TemporaryDirectory(prefix="recarchive-bench-") as tmp:
        root = Path(tmp)
        manifest = root / "ids.txt"
        started = time.perf_counter()
        ids = write_id_manifest(options, manifest, timeout=3600)
        print(f"{len(ids)} IDs listed in {time.perf_counter() - started:.0f} s", flush=True)
        with (
            simulator_process(options, root, start_timeout=3600) as simulator,
            prefect_test_harness(server_startup_timeout=120),
        ):
            api_url = str(PREFECT_API_URL.value())

            def env(name: str) -> dict[str, str]:
                (root / name).mkdir()
                return _env(
                    root / name,
                    simulator.api_url,
                    simulator.access_key,
                    simulator.workspace_id,
                    args,
                )

            cli = measure(
                [str(BIN / "recarchive"), "archive", "--skip-media", "--ids-file", str(manifest)],
                env("cli"),
                sample_seconds=args.sample_seconds,
            )
            print(f"CLI: {cli.seconds:.1f} s, {len(ids) / cli.seconds:.0f} rec/s", flush=True)
            flow_env = {
                **env("flow"),
                "PREFECT_API_URL": api_url,
                "RECARCHIVE_RATE_LIMIT_SHARED": "true",
            }
            flow = measure(
                [
                    sys.executable,
                    "-m",
                    "bench.backfill_scale",
                    "--run-flow",
                    str(manifest),
                    "--parallel-chunks",
                    str(args.parallel_chunks),
                    *(["--dev-pandas"] if args.dev_pandas else []),
                ],
                flow_env,
                sample_seconds=args.sample_seconds,
            )
            result = json.loads(flow.output.split("RESULT ", 1)[1].splitlines()[0])
            print(f"flow: {flow.seconds:.1f} s, {len(ids) / flow.seconds:.0f} rec/s", flush=True)
            export = measure(
                [str(BIN / "recarchive"), "export", "--full"],
                flow_env,
                sample_seconds=1.0,
            )
    chunks = -(-len(ids) // args.chunk_size)
    first, last = _quarters(flow.samples_mb)
    print(
        f"\n{len(ids)} IDs, metadata only, chunks of {args.chunk_size} ({chunks}), concurrency "
        f"{args.concurrency}, {args.parallel_chunks} chunks in parallel"
    )
    print(f"  flow state {result['state']}, counts {result['counts']}")
    print(f"  Arrow's allocator in the flow's process: {result['arrow_pool']}")
    print(
        f"  pandas importable in the flow's process: {args.dev_pandas} (production: False), "
        f"imported: {result['pandas_imported']}"
    )
    print(
        f"  flow process RSS: {len(flow.samples_mb)} samples every {args.sample_seconds:g} s, "
        f"first quarter {first:.0f} MB, last quarter {last:.0f} MB, peak {flow.peak_mb:.0f} MB "
        f"(target flat, <= 300 MB)"
    )
    print(f"  flow RSS samples (MB): {' '.join(f'{mb:.0f}' for mb in flow.samples_mb)}")
    print(f"  task runs {result['task_runs']} for {chunks} chunks (target equal)")
    print(
        f"  throughput: CLI {len(ids) / cli.seconds:.0f} rec/s ({cli.seconds:.0f} s, peak "
        f"{cli.peak_mb:.0f} MB), flow {len(ids) / flow.seconds:.0f} rec/s "
        f"({flow.seconds:.0f} s): flow / CLI {cli.seconds / flow.seconds:.2f} (target >= 0.9)"
    )
    print(f"  export --full: {export.seconds:.1f} s, peak RSS {export.peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
