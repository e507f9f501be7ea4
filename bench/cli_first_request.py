"""Time from starting ``recarchive archive`` to its first API request, and to its exit.

Run: ``.venv/bin/python -m bench.cli_first_request [--ids 5] [--runs 5]``. A handful of IDs
must not feel slow (target: first request within 3 s). Baseline in the same run: the start-up
of a bare ``python -c "import httpx"``, i.e. what any Python tool pays before its first byte.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recarchive.simulator.server import SimulatorConfig, SimulatorServer


def main() -> None:
    """Run the CLI a few times against an in-process simulator and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ids", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    cli = str(Path(sys.executable).parent / "recarchive")
    firsts: list[float] = []
    totals: list[float] = []
    bare: list[float] = []
    with (
        SimulatorServer(SimulatorConfig(recordings=50, seed=3)) as sim,
        tempfile.TemporaryDirectory() as tmp,
    ):
        for run in range(args.runs + 1):
            env = {
                **os.environ,
                "RECARCHIVE_BIRD_API_URL": sim.api_url,
                "RECARCHIVE_BIRD_ACCESS_KEY": sim.config.access_key,
                "RECARCHIVE_WORKSPACE_ID": sim.config.workspace_id,
                # One database: the first run creates the schema (a one-off), later runs
                # open it as every nightly or ad-hoc run does.
                "RECARCHIVE_DATABASE_URL": f"sqlite:///{tmp}/archive.db",
                "RECARCHIVE_PARQUET_ROOT": f"{tmp}/parquet",
            }
            sim.clear_requests()
            started = time.monotonic()
            subprocess.run(
                [cli, "archive", "--skip-media", *sim.dataset.ids[: args.ids]],
                env=env,
                check=True,
                capture_output=True,
            )
            if run == 0:
                continue  # schema creation
            totals.append(time.monotonic() - started)
            firsts.append(min(r.at for r in sim.requests) - started)
            started = time.monotonic()
            subprocess.run([sys.executable, "-c", "import httpx"], check=True)
            bare.append(time.monotonic() - started)
    print(f"recarchive archive --skip-media with {args.ids} IDs, {args.runs} runs (median):")
    print(f"  first API request after {statistics.median(firsts):.2f}s (target < 3 s)")
    print(f"  whole command {statistics.median(totals):.2f}s (incl. the Parquet export)")
    print(f"  baseline: python -c 'import httpx' {statistics.median(bare):.2f}s")


if __name__ == "__main__":
    main()
