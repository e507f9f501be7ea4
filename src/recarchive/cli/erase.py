"""``recarchive erase``: remove recordings everywhere on request (:mod:`recarchive.run.erase`)."""

from __future__ import annotations

import asyncio
import json
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
from recarchive.errors import InputError


@handle_errors
def erase_command(
    ids: Annotated[list[str], typer.Argument(help="Recording IDs (UUIDs) to erase.")],
    reason: Annotated[
        str,
        typer.Option(
            "--reason",
            help="Why (recorded in the erasures table and the tombstones; no personal data).",
        ),
    ],
    at_source: Annotated[
        bool, typer.Option("--at-source", help="Delete the media at Bird too. Irreversible.")
    ] = False,
    bypass_governance: Annotated[
        bool,
        typer.Option(
            "--bypass-governance",
            help="Delete object versions under a GOVERNANCE retention "
            "(needs s3:BypassGovernanceRetention).",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Results as JSON.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details.")] = False,
) -> None:
    """Erase recordings everywhere: S3 (every version), SQL, Parquet, and Bird with --at-source.

    Leaves a tombstone (ledger state erased, {id}.erased.json in S3) so that no later run
    fetches them again, and a row per erasure in the erasures table. A recording under
    a COMPLIANCE retention or a legal hold is refused (nothing of it deleted; exit 1).
    """
    from recarchive.ids.read import collect_ids, raise_for_problems
    from recarchive.run.erase import erase_recordings

    configure_logging(verbose)
    if not reason.strip():
        raise InputError("--reason must say why the recordings are erased")
    settings = load_settings()
    apply_log_format(settings.log_format)
    with collect_ids(ids, [], spool_dir=settings.temp_dir) as id_list:
        raise_for_problems(id_list)
        report = asyncio.run(
            erase_recordings(
                settings,
                id_list,
                reason=reason.strip(),
                at_source=at_source,
                bypass_governance=bypass_governance,
            )
        )
    if as_json:
        out.print_json(
            json.dumps(
                [
                    {
                        "id": result.recording_id,
                        "result": result.result,
                        "message": result.message,
                        "erasure": result.record.id if result.record else None,
                    }
                    for result in report.results
                ]
            )
        )
    else:
        for result in report.results:
            console = out if result.ok else err
            console.print(
                f"{result.recording_id} {result.result}: {result.message}",
                highlight=False,
                markup=False,
            )
    raise typer.Exit(EXIT_OK if report.all_ok else EXIT_ITEMS_FAILED)
