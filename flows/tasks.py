"""The one Prefect task of recarchive: a chunk of recordings through the pipeline."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from recarchive.model import RunCounts
from recarchive.run.chunk import archive_chunk
from recarchive.run.context import ArchiveContext, ChunkOptions
from recarchive.run.failures import should_retry_chunk
from recarchive.run.runs import RunReport, report_table


def _retry_condition(task: Any, task_run: Any, state: Any) -> bool:
    data = getattr(state, "data", None)
    return should_retry_chunk(data if isinstance(data, BaseException) else None)


@task(
    name="archive-chunk",
    task_run_name="chunk-from-{ids[0]}",
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=_retry_condition,
    # The context holds live clients and must not be hashed, stored or cached; results are
    # small counts, never payloads.
    cache_policy=NO_CACHE,
    persist_result=False,
    cache_result_in_memory=False,
)
async def archive_chunk_task(
    ctx: ArchiveContext, ids: list[str], options: ChunkOptions
) -> RunCounts:
    """Archive one chunk; retried by Prefect only for chunk-level failures."""
    return await archive_chunk(ctx, ids, options)


async def publish_report(report: RunReport, *, key: str) -> None:
    """Attach the run's counts and first failures to the flow run as a table artifact."""
    from prefect.artifacts import acreate_table_artifact

    await acreate_table_artifact(
        table=report_table(report),
        key=key,
        description=f"recarchive {report.kind} run {report.run_id}: {report.status}",
    )
