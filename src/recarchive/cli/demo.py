"""``recarchive demo``: the whole pipeline on one machine, with nothing to configure.

It starts the Bird simulator and moto's S3 server on loopback, archives the simulator's
recordings into a SQLite database and a local Parquet dataset, runs once more after the
not-yet-available recordings become available (showing that reruns resume and never
transfer twice), prints a DuckDB query over the dataset, and stops its servers.

The demo writes under its own ``--data-dir`` (``recarchive-data/demo``), not the default
archive paths: its S3 endpoint lives only as long as the demo, so its ledger must not mix
with a real archive's.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

from rich.console import Console

from recarchive.cli.progress import ProgressReporter, result_table, summary_table
from recarchive.config import Settings
from recarchive.errors import UsageError
from recarchive.ids.spool import spool_ids
from recarchive.model import RunCounts
from recarchive.run.context import ChunkOptions

DEMO_MARKER = ".recarchive-demo"
DEMO_BUCKET = "recarchive-demo"
SAMPLE_QUERY = (
    "SELECT created_month, count(*) AS recordings, count(media_s3_uri) AS with_media, "
    "round(sum(media_size_bytes) / 1e6, 1) AS media_mb, "
    "count(*) FILTER (WHERE originator_number_anonymous) AS anonymous_callers "
    "FROM recordings GROUP BY created_month ORDER BY created_month"
)


def _prepare_data_dir(data_dir: Path) -> None:
    """Empty ``data_dir`` if it is a demo folder; refuse to touch anything else."""
    if data_dir.exists() and any(data_dir.iterdir()):
        if not (data_dir / DEMO_MARKER).exists():
            raise UsageError(
                f"{data_dir} exists and was not made by the demo; pass --data-dir with a new "
                "or demo folder (the demo empties it first)"
            )
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / DEMO_MARKER).write_text("made by `recarchive demo`; emptied on each demo run\n")


def run_demo(console: Console, *, recordings: int, data_dir: Path) -> RunCounts:
    """Run the demo and print what it did.

    Args:
        console: Where to print.
        recordings: Size of the simulated dataset.
        data_dir: Folder for the SQLite database and the Parquet dataset (emptied first).

    Returns:
        The counts of both runs added up.
    """
    import boto3
    from moto.server import ThreadedMotoServer

    from recarchive.export.query import run_query
    from recarchive.run.runs import archive_ids
    from recarchive.simulator.server import SimulatorConfig, SimulatorServer

    started = time.monotonic()
    _prepare_data_dir(data_dir)
    # Dummy credentials for the local S3 endpoint only; real ones are never needed here.
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "demo"),
        ("AWS_SECRET_ACCESS_KEY", "demo"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ[name] = value
    s3_server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3_server.start()
    simulator = SimulatorServer(
        SimulatorConfig(
            recordings=recordings,
            seed=2026,
            faults="500,slow,truncate,expired",
            media_size_range=(8_000, 400_000),
        )
    )
    simulator.start()
    try:
        host, port = s3_server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=DEMO_BUCKET)
        settings = Settings(
            bird_api_url=simulator.api_url,
            bird_access_key=simulator.config.access_key,
            workspace_id=simulator.config.workspace_id,
            database_url=f"sqlite:///{data_dir / 'archive.db'}",
            parquet_root=str(data_dir / "parquet"),
            s3_bucket=DEMO_BUCKET,
            s3_endpoint_url=endpoint,
            requests_per_second=400,
            concurrency=16,
            chunk_size=100,
        )
        console.print(
            f"Bird simulator on {simulator.api_url} (media host {simulator.media_url}), "
            f"{recordings} recordings, faults: 5xx, slow, truncated and expired "
            f"media links"
        )
        console.print(
            f"S3 (moto) on {endpoint}, bucket {DEMO_BUCKET}; SQLite and Parquet under {data_dir}/"
        )
        total = RunCounts()
        ids = list(simulator.dataset.ids)
        for title in ("First run", "Second run (pending media became available)"):
            with (
                spool_ids(ids, source="demo") as id_list,
                ProgressReporter(console, len(id_list)) as progress,
            ):
                report = asyncio.run(
                    archive_ids(
                        settings,
                        id_list,
                        ChunkOptions(),
                        kind="demo",
                        params={"ids": len(id_list)},
                        on_progress=progress.update,
                    )
                )
            console.print(summary_table(report.counts, f"{title}: {report.seconds:.1f}s"))
            total.add(report.counts)
            simulator.dataset.make_all_available()
        leaks = len(simulator.leaks)
        console.print(f"Authorization headers seen by the media host: {leaks}")
        console.print(f"\nSample query ([bold]recarchive query[/bold]):\n  {SAMPLE_QUERY}")
        columns, rows = run_query(settings.parquet_root, SAMPLE_QUERY)
        console.print(result_table(columns, rows))
        example = 'recarchive query "SELECT status, count(*) FROM recordings GROUP BY 1"'
        console.print(
            f"Try it yourself:\n  RECARCHIVE_PARQUET_ROOT={settings.parquet_root} {example}\n"
            f"Demo finished in {time.monotonic() - started:.1f}s."
        )
        return total
    finally:
        simulator.stop()
        s3_server.stop()
