"""``--dry-run`` of ``archive`` and ``retry-failed``: the plan, as a table or as JSON."""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING

from rich.table import Table

from recarchive.cli.output import EXIT_OK, err, out
from recarchive.config import Settings

if TYPE_CHECKING:
    from recarchive.ids.spool import IdList
    from recarchive.run.context import ChunkOptions
    from recarchive.run.dryrun import DryRunPlan


def print_plan(plan: DryRunPlan, *, as_json: bool) -> int:
    """Print what the run would do: one row per category and the totals, or one JSON object.

    Returns:
        The exit code: 0 (bad input and configuration were refused before, as in a real run).
    """
    from recarchive.run.dryrun import CATEGORIES

    if as_json:
        # Plain print: one line a machine can parse, no colour codes or wrapping.
        print(json.dumps(plan.as_json(), sort_keys=True))
        return EXIT_OK
    table = Table("would", "recordings", "what the real run does", title="Dry run: nothing sent")
    for name, count in plan.counts.items():
        if count:
            table.add_row(name, str(count), CATEGORIES[name])
    out.print(table)
    database = "none yet (every ID is new)" if plan.database == "missing" else plan.database
    out.print(
        f"{plan.requested} recordings: {plan.to_fetch} would be fetched, "
        f"{plan.requested - plan.to_fetch} skipped without a request. Database: {database}."
    )
    if plan.invalid:
        out.print(f"{plan.invalid} listed IDs are not valid recording IDs (the run fails them).")
    if plan.transcriptions:
        out.print(
            f"{plan.transcriptions} archived recordings' transcriptions would be listed again."
        )
    return EXIT_OK


def plan_list(settings: Settings, id_list: IdList, options: ChunkOptions) -> DryRunPlan:
    """The plan of ``archive`` over an ID list."""
    from recarchive.run.dryrun import plan_archive

    return plan_archive(settings, id_list.chunks(settings.chunk_size), options)


async def plan_window(
    settings: Settings, since: datetime, until: datetime, options: ChunkOptions
) -> DryRunPlan:
    """The plan of ``archive --since/--until``: the window's list pages are its only requests."""
    from recarchive.ids.window import Window
    from recarchive.run.dryrun import plan_archive
    from recarchive.run.inputs import discover_window

    err.print(f"listing recordings created in [{since.isoformat()}, {until.isoformat()}) ...")
    # The shared rate limit lives in the ledger database: a dry run must not write there.
    local = settings.model_copy(update={"rate_limit_shared": False})
    with await discover_window(local, Window(since, until)) as id_list:
        plan = plan_archive(settings, id_list.chunks(settings.chunk_size), options)
        plan.invalid = id_list.invalid
        return plan
