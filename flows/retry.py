"""Flow ``retry-failed`` (deployment ``retry-failed``, hourly): due failures again."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.tasks import archive_chunk_task, flow_artifacts, runs_state
from recarchive.config import load_settings
from recarchive.run.runs import retry_failed


@flow(name="retry-failed", log_prints=False)
async def retry_failed_flow(
    skip_media: bool = False, max_parallel_chunks: int = 2
) -> Any:  # a State: calling the flow returns its data (see Returns)
    """Retry due failures, and look again at recordings whose media was not ready.

    Ends *Partial* when recordings failed again, *Failed* when the run stopped or its export
    failed (the rule of every flow: :mod:`recarchive.run.outcome`). No progress artifact:
    the due failures are found chunk by chunk, so there is no total to measure against.

    Returns:
        The final state; its data is the run's counts.
    """
    artifacts = flow_artifacts()
    report = await retry_failed(
        load_settings(),
        skip_media=skip_media,
        run_chunk=archive_chunk_task,
        max_parallel_chunks=max_parallel_chunks,
    )
    await artifacts.publish(report)
    return runs_state([report], report.counts.as_dict())
