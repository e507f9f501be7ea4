"""``recarchive hold ID... --on|--off``: the S3 legal hold of archived recordings."""

from __future__ import annotations

from typing import Annotated

import typer

from recarchive.cli.logs import apply_log_format
from recarchive.cli.output import EXIT_ITEMS_FAILED, EXIT_OK, configure_logging, handle_errors, out
from recarchive.config import load_settings


@handle_errors
def hold_command(
    ids: Annotated[list[str], typer.Argument(help="Recording IDs (UUIDs).")],
    on: Annotated[
        bool | None,
        typer.Option("--on/--off", help="Set the legal hold, or clear it.", show_default=False),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details.")] = False,
) -> None:
    """Set (--on) or clear (--off) the S3 legal hold of archived recordings' MP3 and sidecar.

    Exit 1 when some recordings could not be held (unknown, not archived, or S3 failed).
    """
    from recarchive.errors import InputError
    from recarchive.ids.read import collect_ids, raise_for_problems
    from recarchive.run.holds import set_holds

    configure_logging(verbose)
    if on is None:
        raise InputError("say --on (set the legal hold) or --off (clear it)")
    settings = load_settings()
    apply_log_format(settings.log_format)
    with collect_ids(ids, spool_dir=settings.temp_dir) as id_list:
        raise_for_problems(id_list)
        report = set_holds(settings, list(id_list), on=on)
    state = "on" if on else "off"
    out.print(
        f"legal hold {state} for {len(report.done)} recordings ({report.versions} object versions)"
    )
    for recording_id in report.unknown:
        out.print(
            f"  {recording_id}: not in the ledger", highlight=False, markup=False, soft_wrap=True
        )
    for recording_id, ledger_state in report.not_archived.items():
        out.print(
            f"  {recording_id}: not archived (ledger state {ledger_state})",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    for recording_id, error in report.failed.items():
        out.print(
            f"  {recording_id}: failed: {error}", highlight=False, markup=False, soft_wrap=True
        )
    raise typer.Exit(EXIT_OK if report.complete else EXIT_ITEMS_FAILED)
