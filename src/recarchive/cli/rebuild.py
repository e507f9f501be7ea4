"""``recarchive rebuild``: SQL and Parquet from the S3 archive alone, into an empty database."""

from __future__ import annotations

from typing import Annotated

import typer

from recarchive.cli.logs import apply_log_format
from recarchive.cli.output import (
    EXIT_ITEMS_FAILED,
    EXIT_OK,
    configure_logging,
    err,
    handle_errors,
    out,
)
from recarchive.config import load_settings


@handle_errors
def rebuild_command(
    verify: Annotated[
        bool,
        typer.Option(
            "--verify", help="Hash every MP3 against its sha256 metadata (reads the archive)."
        ),
    ] = False,
    overwrite_parquet: Annotated[
        bool,
        typer.Option("--overwrite-parquet", help="Export even if the Parquet root holds files."),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details.")] = False,
) -> None:
    """Rebuild the SQL tables and the Parquet dataset from the S3 archive alone.

    The media bucket is only read. The database must be empty (a new RECARCHIVE_DATABASE_URL),
    or hold only a rebuild that stopped, which is then continued. A Parquet root that holds
    files is refused unless --overwrite-parquet. Exit 1 when some objects could not be rebuilt
    (they are listed), else 0.
    """
    from recarchive.run.rebuild import rebuild

    configure_logging(verbose)
    settings = load_settings()
    apply_log_format(settings.log_format)
    report = rebuild(
        settings,
        verify=verify,
        overwrite_parquet=overwrite_parquet,
        on_progress=lambda seen: err.print(f"looked at {seen} recordings"),
    )
    exported = report.export.rows if report.export else 0
    out.print(
        f"rebuilt {report.recordings} recordings ({report.bytes} bytes of MP3) from "
        f"s3://{settings.s3_bucket}/{settings.s3_prefix}/; Parquet: {exported} rows exported."
    )
    if report.erased:
        out.print(f"{report.erased} erased recordings kept as tombstones (never fetched again).")
    if report.first_created and report.last_created:
        out.print(
            f"Rebuilt recordings were created from {report.first_created:%Y-%m-%d} to "
            f"{report.last_created:%Y-%m-%d}. Recordings whose media was never archived are not "
            "in S3: list their window again (`recarchive archive --since ... --until ...`)."
        )
    if report.unhashed:
        out.print(
            f"{len(report.unhashed)} MP3s are in an archive storage class and were not hashed "
            "(`recarchive verify --restore` makes them readable, then `verify --deep`)."
        )
    if not verify and report.recordings:
        out.print("Object metadata was trusted: `recarchive verify --deep` checks every byte.")
    if report.without_sidecar:
        out.print(
            f"{len(report.without_sidecar)} MP3s have no sidecar (a run was killed between the "
            "two writes): registered pending at their key; `recarchive retry-failed` adopts "
            "them without downloading them again:"
        )
        for recording_id in report.without_sidecar[:20]:
            out.print(f"  {recording_id}", highlight=False)
    for recording_id, why in report.skipped[:20]:
        out.print(f"  not rebuilt {recording_id}: {why}", highlight=False, markup=False)
    if len(report.skipped) > 20:
        out.print(f"  ... and {len(report.skipped) - 20} more")
    problems = report.skipped or report.without_sidecar
    raise typer.Exit(EXIT_ITEMS_FAILED if problems else EXIT_OK)
