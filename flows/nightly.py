"""Flow ``nightly-archive`` (deployment ``nightly``): yesterday's recordings, then due retries."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect import flow

from flows.tasks import archive_chunk_task, publish_report
from recarchive.config import load_settings
from recarchive.orchestration import discover_window, nightly_window
from recarchive.pipeline import ChunkOptions
from recarchive.runner import archive_ids, raise_for_export, retry_failed
from recarchive.when import parse_when


@flow(name="nightly-archive", log_prints=False)
async def nightly_archive(
    day: str | None = None,
    days: int = 1,
    overlap_hours: float = 6.0,
    skip_media: bool = False,
    max_parallel_chunks: int = 2,
) -> dict[str, Any]:
    """Archive the recordings created in the previous UTC day(s), then retry due failures.

    Args:
        day: The last UTC day to archive (``YYYY-MM-DD``); yesterday by default. Set it to
            re-run a night that was missed.
        days: Whole UTC days to cover, ending with ``day``.
        overlap_hours: How far the window reaches back beyond those days, so late
            recordings are not missed.
        skip_media: Metadata only.
        max_parallel_chunks: Chunk tasks in flight at once.

    Returns:
        Counts of the window run and of the retry run.
    """
    settings = load_settings()
    now = parse_when(day, "day") + timedelta(days=1) if day else None
    window = nightly_window(now, days=days, overlap_hours=overlap_hours)
    with await discover_window(settings, window) as id_list:
        report = await archive_ids(
            settings,
            id_list,
            ChunkOptions(skip_media=skip_media),
            kind="nightly",
            params={**window.as_params(), "ids": len(id_list)},
            run_chunk=archive_chunk_task,
            max_parallel_chunks=max_parallel_chunks,
        )
    await publish_report(report, key="nightly-archive")
    retried = await retry_failed(
        settings,
        skip_media=skip_media,
        run_chunk=archive_chunk_task,
        max_parallel_chunks=max_parallel_chunks,
    )
    await publish_report(retried, key="nightly-retry-failed")
    raise_for_export(report)
    raise_for_export(retried)
    return {
        "window": window.as_params(),
        "archive": report.counts.as_dict(),
        "retry_failed": retried.counts.as_dict(),
    }
