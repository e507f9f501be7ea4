"""How a run's chunks run: directly or through a Prefect task, and how many at once.

A run hands its chunks (lists of IDs, pulled one by one from its input) to a
:data:`ChunkRunner`: the pipeline itself (:func:`direct_chunk_runner`, the CLI) or the
flows' Prefect task around it. :func:`run_chunks` keeps a few of them in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

from recarchive.errors import first_error
from recarchive.model import RunCounts
from recarchive.run.chunk import archive_chunk
from recarchive.run.context import ArchiveContext, ChunkOptions, ProgressCallback

#: How one chunk of a run runs.
ChunkRunner = Callable[[ArchiveContext, list[str], ChunkOptions], Awaitable[RunCounts]]


#: Chunks a direct run keeps in flight: while one writes its batch to SQL, the next one's
#: requests go on (bench/peers.py), within the one concurrency limit they share.
DIRECT_PARALLEL_CHUNKS = 2


def direct_chunk_runner(on_progress: ProgressCallback | None = None) -> ChunkRunner:
    """A chunk runner that calls the pipeline directly (no Prefect task around it).

    Its chunks share one limit of ``ctx.concurrency`` items in flight, however many of them
    run at once: side by side they overlap one's SQL work with the other's requests, never
    sending more requests at once than the run's ``concurrency``.
    """
    limit: asyncio.Semaphore | None = None

    async def run(ctx: ArchiveContext, chunk: list[str], options: ChunkOptions) -> RunCounts:
        nonlocal limit
        if limit is None:  # made in the loop that runs the chunks
            limit = asyncio.Semaphore(ctx.concurrency)
        return await archive_chunk(ctx, chunk, options, on_progress, limit=limit)

    return run


def chunk_runner(
    run_chunk: ChunkRunner | None, on_progress: ProgressCallback | None, parallel: int | None
) -> tuple[ChunkRunner, int]:
    """A run's chunk runner and how many chunks it keeps in flight.

    Args:
        run_chunk: How each chunk runs (a Prefect task in flows); ``None``: directly.
        on_progress: Progress callback per finished item (direct runs).
        parallel: Chunks in flight at once; ``None``: :data:`DIRECT_PARALLEL_CHUNKS` when
            they run directly (sharing one limit of ``concurrency``), else 1.

    Returns:
        The runner and its number of chunks in flight.
    """
    if run_chunk is not None:
        return run_chunk, 1 if parallel is None else parallel
    runner = direct_chunk_runner(on_progress)
    return runner, DIRECT_PARALLEL_CHUNKS if parallel is None else parallel


async def run_chunks(
    ctx: ArchiveContext,
    chunks: Iterable[list[str]],
    options: ChunkOptions,
    run_chunk: ChunkRunner,
    *,
    max_parallel_chunks: int = 1,
    total: RunCounts | None = None,
) -> RunCounts:
    """Run ``run_chunk`` over ``chunks`` (lists of IDs), ``max_parallel_chunks`` at once.

    Chunks are pulled from the iterator only when a slot frees up, so a backfill of millions
    of IDs holds ``max_parallel_chunks`` chunks in memory, not the whole list. A fatal error
    in one chunk cancels the others (their leases are released by the pipeline). Finished
    chunks' counts are added to ``total`` (a new one when ``None``) as they finish, so after
    a fatal error it still holds what they did; it is returned.
    """
    total = RunCounts() if total is None else total
    slots = asyncio.Semaphore(max_parallel_chunks)

    async def one(chunk: list[str]) -> None:
        try:
            total.add(await run_chunk(ctx, chunk, options))
        finally:
            slots.release()

    try:
        async with asyncio.TaskGroup() as group:
            for chunk in chunks:
                await slots.acquire()
                group.create_task(one(chunk))
    except BaseExceptionGroup as group_error:
        raise first_error(group_error) from None
    return total
