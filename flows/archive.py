"""Flow ``archive-recordings`` (deployment ``archive-ids``): archive a list or manifest of IDs."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.tasks import archive_chunk_task, flow_artifacts, runs_state
from recarchive.config import load_settings
from recarchive.run.context import ChunkOptions
from recarchive.run.inputs import open_id_input
from recarchive.run.runs import archive_ids


@flow(name="archive-recordings", log_prints=False)
async def archive_recordings(
    ids: list[str] | None = None,
    ids_file: str | None = None,
    skip_media: bool = False,
    refresh: bool = False,
    chunk_size: int | None = None,
    max_parallel_chunks: int = 2,
) -> Any:  # a State: calling the flow returns its data (see Returns)
    """Archive the given IDs in chunks (one Prefect task each), then export Parquet.

    The run ends *Completed*; *Partial* (a Completed-type state) when recordings ended
    ``failed``: the run finished what it could, the failures are in the ledger with their
    next attempt, and ``retry-failed`` takes them; *Failed* when the run stopped or its
    Parquet export failed (see :mod:`recarchive.run.outcome`).

    Args:
        ids: Recording IDs (small runs; big ones pass a manifest).
        ids_file: Manifest of IDs: a local path or ``s3://bucket/key``.
        skip_media: Metadata only.
        refresh: Re-fetch metadata of every given ID.
        chunk_size: IDs per chunk task (``RECARCHIVE_CHUNK_SIZE`` by default).
        max_parallel_chunks: Chunk tasks in flight at once.

    Returns:
        The final state; its data (what calling the flow returns) is the run's counts.
    """
    artifacts = flow_artifacts()
    settings = load_settings(chunk_size=chunk_size)
    options = ChunkOptions(skip_media=skip_media, refresh=refresh)
    with open_id_input(settings, ids, ids_file) as id_list:
        report = await archive_ids(
            settings,
            id_list,
            options,
            kind="archive-flow",
            params={
                "ids": len(id_list),
                "ids_file": ids_file,
                "skip_media": skip_media,
                "refresh": refresh,
            },
            run_chunk=await artifacts.progress(len(id_list), archive_chunk_task),
            max_parallel_chunks=max_parallel_chunks,
        )
    await artifacts.publish(report)
    return runs_state([report], report.counts.as_dict())
