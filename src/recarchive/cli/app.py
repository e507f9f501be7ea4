"""The ``recarchive`` command line (typer + rich): its commands and options.

Exit codes and messages: :mod:`recarchive.cli.output`. Heavy imports (Prefect, pyarrow,
DuckDB, boto3) happen inside the commands that need them, so ``recarchive archive`` sends
its first request within a second or two.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from recarchive.cli.ddl import ddl
from recarchive.cli.dryrun import plan_list, plan_window, print_plan
from recarchive.cli.erase import erase_command
from recarchive.cli.hold import hold_command
from recarchive.cli.logs import apply_log_format
from recarchive.cli.output import configure_logging, err, exit_code, handle_errors, out
from recarchive.cli.progress import result_table
from recarchive.cli.rebuild import rebuild_command
from recarchive.cli.status import print_status
from recarchive.cli.summary import finish_run, finish_verify
from recarchive.config import Settings, load_settings
from recarchive.errors import InputError
from recarchive.export.pandas_lookup import skip_in_this_process
from recarchive.ids.window import parse_when
from recarchive.model import LedgerState

if TYPE_CHECKING:
    from recarchive.ids.spool import IdList
    from recarchive.run.context import ChunkOptions
    from recarchive.run.runs import RunReport


app = typer.Typer(
    name="recarchive",
    help="Archive Bird call recordings: metadata to SQL and Parquet, MP3s to S3.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.command("erase")(erase_command)
app.command("ddl")(ddl)


def _settings(**overrides: Any) -> Settings:
    settings = load_settings(**overrides)
    apply_log_format(settings.log_format)
    return settings


VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")]
DryRunOption = Annotated[
    bool,
    typer.Option("--dry-run", help="Show what would happen: no request, nothing written."),
]
JsonOption = Annotated[
    bool,
    typer.Option("--json", help="The summary (or --dry-run's plan) as one JSON object on stdout."),
]


@app.command()
@handle_errors
def archive(
    ids: Annotated[list[str] | None, typer.Argument(help="Recording IDs (UUIDs).")] = None,
    ids_file: Annotated[
        list[str] | None,
        typer.Option(
            "--ids-file",
            help="File of IDs, one per line or CSV with an id column; '-' reads stdin. Repeatable.",
        ),
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Discover IDs created at or after this date/timestamp (UTC).")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="...and before this one (exclusive; default now).")
    ] = None,
    skip_media: Annotated[bool, typer.Option("--skip-media", help="Metadata only.")] = False,
    refresh: Annotated[
        bool, typer.Option("--refresh", help="Re-fetch metadata of every given ID.")
    ] = False,
    skip_invalid: Annotated[
        bool, typer.Option("--skip-invalid", help="Skip invalid IDs instead of stopping.")
    ] = False,
    chunk_size: Annotated[int | None, typer.Option(help="IDs per chunk.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Requests in flight.")] = None,
    dry_run: DryRunOption = False,
    json_output: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Archive the given recordings (metadata to SQL/Parquet, media to S3)."""
    from recarchive.ids.read import collect_ids, raise_for_problems

    configure_logging(verbose)
    settings = _settings(chunk_size=chunk_size, concurrency=concurrency)
    settings.require_bird()
    if not skip_media:
        settings.require_bucket()
    from recarchive.run.context import ChunkOptions

    options = ChunkOptions(skip_media=skip_media, refresh=refresh)
    if since is not None or until is not None:
        if ids or ids_file:
            raise InputError("give IDs or --since/--until, not both")
        if since is None:
            raise InputError("--until needs --since")
        start = parse_when(since, "--since")
        end = parse_when(until, "--until") if until else datetime.now(UTC)
        if end <= start:
            raise InputError(
                f"--until ({end.isoformat()}) must be after --since ({start.isoformat()})"
            )
        if dry_run:
            plan = asyncio.run(plan_window(settings, start, end, options))
            raise typer.Exit(print_plan(plan, as_json=json_output))
        if not skip_media:  # the bucket's Object Lock, before the window's list requests
            from recarchive.run.clients import check_media_bucket

            check_media_bucket(settings)
        report, invalid = asyncio.run(_discover_and_archive(settings, start, end, options))
        raise typer.Exit(finish_run(report, "archive", as_json=json_output, invalid_ids=invalid))
    if not ids and not ids_file:
        raise InputError("no IDs given: pass IDs, --ids-file PATH (or -), or --since/--until")
    with collect_ids(ids or [], ids_file or [], spool_dir=settings.temp_dir) as id_list:
        if id_list.invalid:
            if not skip_invalid:
                raise_for_problems(id_list)
            err.print(f"skipping {id_list.invalid} invalid IDs (--skip-invalid):")
            for problem in id_list.problems[:20]:
                err.print(f"  {problem}", highlight=False, markup=False)
        if dry_run:
            raise typer.Exit(print_plan(plan_list(settings, id_list, options), as_json=json_output))
        report = asyncio.run(
            _archive_list(
                settings,
                id_list,
                options,
                {
                    "ids": len(id_list),
                    "skip_media": skip_media,
                    "refresh": refresh,
                },
            )
        )
    raise typer.Exit(finish_run(report, "archive", as_json=json_output))


async def _archive_list(
    settings: Settings,
    id_list: IdList,
    options: ChunkOptions,
    params: dict[str, Any],
    kind: str = "archive",
) -> RunReport:
    from recarchive.cli.progress import ProgressReporter
    from recarchive.run.runs import archive_ids

    with ProgressReporter(err, len(id_list)) as progress:
        return await archive_ids(
            settings, id_list, options, kind=kind, params=params, on_progress=progress.update
        )


async def _discover_and_archive(
    settings: Settings, since: datetime, until: datetime, options: ChunkOptions
) -> tuple[RunReport, int]:
    """Archive a window's IDs; returns the report and the listed IDs that were not valid."""
    from recarchive.ids.window import Window
    from recarchive.run.inputs import discover_window

    err.print(f"listing recordings created in [{since.isoformat()}, {until.isoformat()}) ...")
    id_list = await discover_window(settings, Window(since, until))
    with id_list:
        err.print(f"found {len(id_list)} recordings")
        if id_list.invalid:
            # Not ours to archive, but not to be hidden either: the API listed something that
            # is not a recording ID. Reported, counted as failed (exit 1), the rest goes on.
            err.print(f"{id_list.invalid} listed IDs are not valid recording IDs:", markup=False)
            for problem in id_list.problems:
                err.print(f"  {problem}", markup=False, highlight=False)
        report = await _archive_list(
            settings,
            id_list,
            options,
            {
                "since": since.isoformat(),
                "until": until.isoformat(),
                "ids": len(id_list),
                "skip_media": options.skip_media,
            },
        )
        return report, id_list.invalid


@app.command("retry-failed")
@handle_errors
def retry_failed_command(
    skip_media: Annotated[bool, typer.Option("--skip-media", help="Metadata only.")] = False,
    dry_run: DryRunOption = False,
    json_output: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Retry due failures, and look again at recordings whose media was not ready."""
    from recarchive.cli.progress import ProgressReporter
    from recarchive.run.runs import retry_failed

    configure_logging(verbose)
    settings = _settings()
    if dry_run:
        from recarchive.run.dryrun import plan_retry

        plan = plan_retry(settings, skip_media=skip_media)
        raise typer.Exit(print_plan(plan, as_json=json_output))
    with ProgressReporter(err, None) as progress:
        report = asyncio.run(
            retry_failed(settings, skip_media=skip_media, on_progress=progress.update)
        )
    raise typer.Exit(finish_run(report, "retry-failed", as_json=json_output))


@app.command()
@handle_errors
def status(
    failed: Annotated[
        bool, typer.Option("--failed", help="List failed and missing recordings.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    limit: Annotated[int, typer.Option(help="Rows of --failed and of recent runs.")] = 50,
) -> None:
    """Show ledger counts per state, recent runs, and (--failed) failed and missing recordings."""
    from recarchive.run.database import open_store

    configure_logging(False)
    engine, store = open_store(_settings())
    try:
        counts = store.counts()
        locks = store.lock_counts()
        runs = store.last_runs(limit=min(limit, 10))
        failures = store.failed_entries(limit=limit) if failed else []
        missing = store.failed_entries(limit=limit, state=LedgerState.MISSING) if failed else []
        erasures = store.erasure_counts()
    finally:
        engine.dispose()
    print_status(
        counts,
        runs,
        failures if failed else None,
        missing,
        as_json=as_json,
        erasures=erasures,
        locks=locks,
    )


@app.command()
@handle_errors
def verify(
    deep: Annotated[bool, typer.Option("--deep", help="Download and hash every object.")] = False,
    delete_source_after_verify: Annotated[
        bool,
        typer.Option(
            "--delete-source-after-verify",
            help="After a deep verification of an object succeeds, delete that "
            "recording's media at Bird. Implies --deep. Irreversible.",
        ),
    ] = False,
    restore: Annotated[
        bool,
        typer.Option("--restore", help="Ask S3 to restore objects that need it. Implies --deep."),
    ] = False,
    verbose: VerboseOption = False,
    as_json: JsonOption = False,
) -> None:
    """Check every archived recording against S3: exists, size, SHA-256."""
    from recarchive.run.verify import run_verify

    configure_logging(verbose)
    settings = _settings()
    started = time.monotonic()
    report = asyncio.run(
        run_verify(
            settings,
            deep=deep or delete_source_after_verify,
            delete_source=delete_source_after_verify,
            console=err,
            restore=restore,
        )
    )
    seconds = time.monotonic() - started
    deep = deep or delete_source_after_verify or restore
    raise typer.Exit(finish_verify(report, as_json=as_json, deep=deep, seconds=seconds))


@app.command()
@handle_errors
def export(
    full: Annotated[bool, typer.Option("--full", help="Rewrite every partition.")] = False,
) -> None:
    """Rewrite the Parquet partitions changed since the last export."""
    from recarchive.run.database import open_store
    from recarchive.run.parquet import export_parquet

    configure_logging(False)
    settings = _settings()
    engine, _ = open_store(settings)
    try:
        report = export_parquet(settings, engine, full=full)
    finally:
        engine.dispose()
    out.print(
        f"exported {report.rows} rows in {len(report.partitions)} partitions to "
        f"{settings.parquet_root} in {report.seconds:.1f}s"
    )


@app.command()
@handle_errors
def query(
    sql: Annotated[
        str, typer.Argument(help="DuckDB SQL over the views recordings and recording_parties.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Rows as JSON.")] = False,
) -> None:
    """Query the Parquet dataset with DuckDB."""
    from recarchive.export.query import run_query

    settings = _settings()
    columns, rows = run_query(settings.parquet_root, sql, s3_endpoint_url=settings.s3_endpoint_url)
    if as_json:
        out.print_json(
            json.dumps([dict(zip(columns, row, strict=True)) for row in rows], default=str)
        )
        return
    out.print(result_table(columns, rows))


@app.command()
@handle_errors
def simulate(
    port: Annotated[int, typer.Option(help="API port.")] = 8787,
    media_port: Annotated[int, typer.Option(help="Media host port.")] = 8788,
    recordings: Annotated[int, typer.Option(help="Recordings in the dataset.")] = 300,
    seed: Annotated[int, typer.Option(help="Dataset and fault seed.")] = 1,
    faults: Annotated[
        str,
        typer.Option(
            help="none, flaky, ratelimit, chaos, or a comma "
            "list of 429,500,reset,slow,truncate,expired,"
            "notready,404."
        ),
    ] = "none",
    rate_limit: Annotated[float | None, typer.Option(help="API requests/s before 429s.")] = None,
    access_key: Annotated[str, typer.Option(help="Key the simulator accepts.")] = "sim-access-key",
    media_size_min: Annotated[int, typer.Option(help="Smallest MP3 in bytes.")] = 4_000,
    media_size_max: Annotated[int, typer.Option(help="Largest MP3 in bytes.")] = 400_000,
    latency: Annotated[float, typer.Option(help="Seconds each API request waits.")] = 0.0,
    missing_fraction: Annotated[float, typer.Option(help="Share of IDs answering 404.")] = 0.0,
    list_ids: Annotated[bool, typer.Option("--list-ids", help="Print all IDs and exit.")] = False,
    transcriptions: Annotated[
        bool, typer.Option("--transcriptions", help="About 30 % of recordings have some.")
    ] = False,
    lazy: Annotated[bool, typer.Option("--lazy", help="Draw recordings on demand.")] = False,
    stats_file: Annotated[Path | None, typer.Option(help="Write /_sim/stats here on exit.")] = None,
) -> None:
    """Run the Bird API simulator on 127.0.0.1 until interrupted."""
    import sys

    from recarchive.errors import UsageError
    from recarchive.simulator.server import SimulatorConfig, build_dataset, serve

    try:
        config = SimulatorConfig(
            recordings=recordings,
            seed=seed,
            faults=faults,
            rate_limit=rate_limit,
            access_key=access_key,
            port=port,
            media_port=media_port,
            media_size_range=(media_size_min, media_size_max),
            latency_seconds=latency,
            missing_fraction=missing_fraction,
            transcriptions=transcriptions,
            lazy=lazy,
            keep_requests=False,  # nothing reads its log (/_sim/stats counts): flat memory
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if list_ids:
        # Plain writes, not the rich console: a million lines, for a file or a pipe.
        sys.stdout.writelines(f"{recording_id}\n" for recording_id in build_dataset(config).all_ids)
        return
    serve(config, stats_file=stats_file)


@app.command()
@handle_errors
def demo(
    recordings: Annotated[int, typer.Option(help="Recordings to archive.")] = 300,
    data_dir: Annotated[
        Path,
        typer.Option(help="Where the demo's SQLite database and Parquet dataset go (wiped first)."),
    ] = Path("recarchive-data/demo"),
) -> None:
    """Run the whole pipeline locally: simulator, local S3 endpoint, SQLite, Parquet."""
    from recarchive.cli.demo import run_demo

    configure_logging(False)
    counts = run_demo(out, recordings=recordings, data_dir=data_dir)
    raise typer.Exit(exit_code(counts))


app.command("hold")(hold_command)


@db_app.command("upgrade")
@handle_errors
def db_upgrade() -> None:
    """Create or upgrade the database schema in place."""
    from recarchive.run.database import open_store, safe_database_url

    settings = _settings()
    engine, _ = open_store(settings)
    engine.dispose()
    out.print(f"database is up to date: {safe_database_url(settings.database_url)}")


app.command("rebuild")(rebuild_command)


def main() -> None:
    """Console-script entry point."""
    # Only recarchive's commands run in this process, and none hands pandas objects to
    # pyarrow: its exports may skip pyarrow's import of pandas (export/pandas_lookup.py).
    skip_in_this_process()
    app()
