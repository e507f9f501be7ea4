"""Flow ``retry-failed`` (deployment ``retry-failed``, hourly): due failures again."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.tasks import archive_chunk_task, publish_report
from recarchive.config import load_settings
from recarchive.run.runs import raise_for_export, retry_failed


@flow(name="retry-failed", log_prints=False)
async def retry_failed_flow(
    skip_media: bool = False, max_parallel_chunks: int = 2
) -> dict[str, Any]:
    """Retry due failures, and look again at recordings whose media was not ready.

    Returns:
        The run's counts.
    """
    report = await retry_failed(
        load_settings(),
        skip_media=skip_media,
        run_chunk=archive_chunk_task,
        max_parallel_chunks=max_parallel_chunks,
    )
    await publish_report(report, key="retry-failed")
    raise_for_export(report)
    return report.counts.as_dict()
