"""Flow ``nightly-archive`` (deployment ``nightly``): up to the scheduled day, then retries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import flow, get_run_logger

from flows.tasks import archive_chunk_task, flow_artifacts, runs_state
from recarchive.config import load_settings
from recarchive.ids.window import (
    DEFAULT_MAX_CATCH_UP_DAYS,
    parse_when,
    plan_nightly,
    scheduled_time,
)
from recarchive.run.context import ChunkOptions
from recarchive.run.database import open_store
from recarchive.run.inputs import discover_window
from recarchive.run.runs import archive_ids, retry_failed
from recarchive.store.windows import last_listed_end, record_listed_window


@flow(name="nightly-archive", log_prints=False)
async def nightly_archive(
    day: str | None = None,
    days: int = 1,
    overlap_hours: float = 6.0,
    skip_media: bool = False,
    max_parallel_chunks: int = 2,
    max_catch_up_days: int = DEFAULT_MAX_CATCH_UP_DAYS,
) -> Any:  # a State: calling the flow returns its data (see Returns)
    """Archive the recordings created up to the run's scheduled UTC day, then retry failures.

    The window ends at 00:00 UTC of the day the run was scheduled for (not of the day it
    started, so a late worker lists the same window) and starts where the last complete
    listing recorded in the ledger ended, less ``overlap_hours``: nights that were missed or
    failed are listed by the next run that works. The window is recorded once it was listed
    to the last page and its archive run returned.

    The flow run ends in the worse of its two runs' outcomes (:mod:`recarchive.run.outcome`):
    *Partial* (Completed-type) when recordings ended ``failed``, *Failed* when a run stopped
    or an export failed.

    Args:
        day: The last UTC day to archive (``YYYY-MM-DD``): re-runs exactly that night's
            window (``days`` days plus the overlap), whatever the ledger says. By default,
            the days before the scheduled day, from the last listed window on.
        days: Least whole UTC days to cover, ending with ``day`` (or with the day before the
            scheduled day); further back when the last listed window ended earlier.
        overlap_hours: How far the window reaches back beyond its start (those days, or the
            last listed end), so recordings that became visible late are not missed.
        skip_media: Metadata only.
        max_parallel_chunks: Chunk tasks in flight at once.
        max_catch_up_days: Most days listed past the last listed window in one run (at least
            ``days``); a larger gap is listed oldest first over the next runs, with a warning.

    Returns:
        The final state; its data is the window, whether it was recorded, the days still
        behind after this run, and the counts of the window run and of the retry run.
    """
    artifacts = flow_artifacts()
    logger = get_run_logger()
    settings = load_settings()
    engine, _ = open_store(settings)
    try:
        listing_started = datetime.now(UTC)
        plan = plan_nightly(
            last_listed_end(engine),
            _scheduled_time(),
            day=parse_when(day, "day") if day else None,
            days=days,
            overlap_hours=overlap_hours,
            max_catch_up_days=max_catch_up_days,
            now=listing_started,
        )
        window = plan.window
        logger.info("window %s .. %s: %s", window.since, window.until, plan.reason)
        if warning := plan.behind_warning():
            logger.warning(warning)
        with await discover_window(settings, window) as id_list:
            report = await archive_ids(
                settings,
                id_list,
                ChunkOptions(skip_media=skip_media),
                kind="nightly",
                params={**window.as_params(), "ids": len(id_list)},
                run_chunk=await artifacts.progress(len(id_list), archive_chunk_task),
                max_parallel_chunks=max_parallel_chunks,
            )
            # Only here is the window done: listed to its last page (discover_window raises
            # otherwise) and every ID handed to a run that returned. If either raised, it is
            # not recorded and the next night lists it again.
            if plan.record:
                record_listed_window(
                    engine,
                    window,
                    run_id=report.run_id,
                    recordings=len(id_list),
                    listed_at=listing_started,
                )
    finally:
        engine.dispose()
    await artifacts.publish(report)
    retried = await retry_failed(
        settings,
        skip_media=skip_media,
        run_chunk=archive_chunk_task,
        max_parallel_chunks=max_parallel_chunks,
    )
    await artifacts.publish(retried, "retry-failed")
    return runs_state(
        [report, retried],
        {
            "window": window.as_params(),
            "window_recorded": plan.record,
            "days_behind": plan.remaining / timedelta(days=1),
            "archive": report.counts.as_dict(),
            "retry_failed": retried.counts.as_dict(),
        },
    )


def _scheduled_time() -> datetime:
    """The flow run's scheduled time (its start for ad-hoc runs; see ``scheduled_time``)."""
    from prefect.context import FlowRunContext
    from prefect.runtime import flow_run

    context = FlowRunContext.get()
    started = context.flow_run.start_time if context and context.flow_run else None
    scheduled: datetime | None = flow_run.scheduled_start_time
    return scheduled_time(scheduled, started=started)
