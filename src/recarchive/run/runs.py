"""Whole runs: chunks of IDs through the pipeline, the ``runs`` row, and the Parquet export.

The CLI calls these directly (no Prefect API needed: the first request goes out within a
second or two); the flows in ``flows/`` wrap the same pieces with one Prefect task per chunk
(``run_chunk``; chunks of hundreds of IDs, never single recordings) and publish the
:class:`RunReport` as an artifact. Chunks run concurrently in one event loop
(:func:`run_chunks`), so they share one HTTP connection pool and one request pacer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from recarchive.config import Settings
from recarchive.errors import RecarchiveError, StorageUnavailableError, first_error
from recarchive.export.parquet import ExportReport
from recarchive.ids.spool import IdList
from recarchive.leases import active_owner, local_owner_dead, run_owner
from recarchive.model import RunCounts, RunStatus, TranscriptionCounts
from recarchive.redaction import describe
from recarchive.run.chunk import archive_chunk
from recarchive.run.clients import open_archive_context
from recarchive.run.context import ArchiveContext, ChunkOptions, ProgressCallback
from recarchive.run.database import open_store
from recarchive.run.failures import ledger_errors
from recarchive.run.parquet import export_parquet
from recarchive.run.transcripts import retry_transcripts
from recarchive.store.archive import ArchiveStore
from recarchive.store.ledger import DEFAULT_STALE_AFTER, HEARTBEAT_SECONDS
from recarchive.tempfiles import remove_orphan_temp_files

logger = logging.getLogger(__name__)


@dataclass
class RunReport:
    """What a run did.

    Attributes:
        run_id: Row id in ``runs``.
        kind: ``archive``, ``nightly``, ``backfill``, ``retry-failed``.
        status: ``succeeded``, ``partial`` (some items failed or missing) or ``failed``.
        counts: Outcome counters.
        export: The Parquet export that ended the run, if it ran and succeeded.
        seconds: Wall time.
        export_error: Why the Parquet export failed (the run's items are done regardless;
            ``recarchive export`` redoes it), or ``None``.
        transcripts: What the run did with transcriptions (not ``runs`` columns).
    """

    run_id: int
    kind: str
    status: RunStatus
    counts: RunCounts
    export: ExportReport | None
    seconds: float
    export_error: str | None = None
    transcripts: TranscriptionCounts = field(default_factory=TranscriptionCounts)


#: Where the whole list of failed and missing recordings is (reports show the first ones).
FULL_FAILURE_LIST = "recarchive status --failed"


def report_table(report: RunReport) -> list[dict[str, Any]]:
    """Rows of the Prefect table artifact: the counts, then the first failures (transcriptions')."""
    rows: list[dict[str, Any]] = [
        {"item": name, "value": value} for name, value in report.counts.as_dict().items()
    ]
    rows.append({"item": "status", "value": report.status})
    rows.append({"item": "run_id", "value": report.run_id})
    if report.export_error:
        rows.append({"item": "export", "value": report.export_error})
    if report.counts.failed or report.counts.missing:
        rows.append({"item": "every failed and missing recording", "value": FULL_FAILURE_LIST})
    rows.extend(
        {"item": f"failed {recording_id}", "value": error}
        for recording_id, error in report.counts.failures[:50]
    )
    # Transcriptions: their counts when there are any, and their first failures.
    transcripts = report.transcripts
    rows.extend(
        {"item": f"transcriptions {name}", "value": value}
        for name, value in transcripts.as_dict().items()
        if value
    )
    rows.extend(
        {"item": f"transcription failed {recording_id}", "value": error}
        for recording_id, error in transcripts.failures[:50]
    )
    return rows


def run_status(counts: RunCounts, transcripts: TranscriptionCounts | None = None) -> RunStatus:
    """Return ``succeeded`` or ``partial`` for finished counts (a failed transcription too)."""
    ok = counts.all_ok and not (transcripts and transcripts.failed)
    return RunStatus.SUCCEEDED if ok else RunStatus.PARTIAL


ChunkRunner = Callable[[ArchiveContext, list[str], ChunkOptions], Awaitable[RunCounts]]


def direct_chunk_runner(on_progress: ProgressCallback | None = None) -> ChunkRunner:
    """A chunk runner that calls the pipeline directly (no Prefect task around it)."""

    async def run(ctx: ArchiveContext, chunk: list[str], options: ChunkOptions) -> RunCounts:
        return await archive_chunk(ctx, chunk, options, on_progress)

    return run


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


async def archive_ids(
    settings: Settings,
    ids: IdList,
    options: ChunkOptions,
    *,
    kind: str = "archive",
    params: Mapping[str, Any] | None = None,
    on_progress: ProgressCallback | None = None,
    run_chunk: ChunkRunner | None = None,
    max_parallel_chunks: int = 1,
    export: bool = True,
) -> RunReport:
    """Archive every ID of ``ids`` in chunks, record the run, and export changed Parquet.

    Args:
        settings: The run's settings.
        ids: Validated, de-duplicated IDs.
        options: ``skip_media`` / ``refresh``.
        kind: Run kind recorded in ``runs``.
        params: Run parameters recorded in ``runs`` (never secrets).
        on_progress: Progress callback per finished item (direct runs).
        run_chunk: How a chunk runs (a Prefect task in flows); the pipeline by default.
        max_parallel_chunks: Chunks in flight at once.
        export: Rewrite changed Parquet partitions at the end.

    Returns:
        The run report.

    Raises:
        FatalError: The run stopped; its ``runs`` row says ``failed`` with the reason.
    """
    runner = run_chunk or direct_chunk_runner(on_progress)
    engine, store = open_store(settings)
    try:
        async with open_archive_context(settings, store, skip_media=options.skip_media) as ctx:
            return await recorded_run(
                store,
                engine,
                settings,
                kind,
                dict(params or {}),
                export,
                lambda counts: run_chunks(
                    ctx,
                    ids.chunks(settings.chunk_size),
                    options,
                    runner,
                    max_parallel_chunks=max_parallel_chunks,
                    total=counts,
                ),
                owner=ctx.owner,
                register=ids,
                transcripts=ctx.transcripts,
            )
    finally:
        engine.dispose()


async def retry_failed(
    settings: Settings,
    *,
    skip_media: bool = False,
    on_progress: ProgressCallback | None = None,
    run_chunk: ChunkRunner | None = None,
    max_parallel_chunks: int = 1,
    export: bool = True,
) -> RunReport:
    """Archive again every ``failed`` recording whose next attempt is due."""
    runner = run_chunk or direct_chunk_runner(on_progress)
    options = ChunkOptions(skip_media=skip_media)
    engine, store = open_store(settings)
    try:
        async with open_archive_context(settings, store, skip_media=skip_media) as ctx:
            chunks = due_retry_chunks(
                store,
                settings.chunk_size,
                settings.item_max_attempts,
                stale_after=DEFAULT_STALE_AFTER,
            )

            async def work(counts: RunCounts) -> None:
                await run_chunks(
                    ctx,
                    chunks,
                    options,
                    runner,
                    max_parallel_chunks=max_parallel_chunks,
                    total=counts,
                )
                await retry_transcripts(ctx)  # due transcriptions: a pass of their own

            return await recorded_run(
                store,
                engine,
                settings,
                "retry-failed",
                {"skip_media": skip_media},
                export,
                work,
                owner=ctx.owner,
                transcripts=ctx.transcripts,
            )
    finally:
        engine.dispose()


def due_retry_chunks(
    store: ArchiveStore,
    chunk_size: int,
    max_attempts: int,
    *,
    stale_after: timedelta = timedelta(minutes=15),
) -> Iterable[list[str]]:
    """Yield chunks of due failed IDs, each ID at most once per run.

    Terminal failures (no next attempt) are never due: they are retried only when their ID is
    archived explicitly. A retried item that fails again is scheduled later, so it is not due
    again in this run; the seen-set guards against a store that still reports it.
    """
    seen: set[str] = set()
    while True:
        due = [
            recording_id
            for recording_id in store.due_retries(
                limit=chunk_size + len(seen), max_attempts=max_attempts, stale_after=stale_after
            )
            if recording_id not in seen
        ][:chunk_size]
        if not due:
            return
        seen.update(due)
        yield due


async def recorded_run(
    store: ArchiveStore,
    engine: Engine,
    settings: Settings,
    kind: str,
    params: dict[str, Any],
    export: bool,
    work: Callable[[RunCounts], Awaitable[object]],
    *,
    owner: str,
    register: Iterable[str] | None = None,
    transcripts: TranscriptionCounts | None = None,
) -> RunReport:
    """Run ``work`` between a ``runs`` row's start and finish, then export Parquet.

    ``work`` adds to the counts it is given as it goes. A failure still finishes the row
    (``failed`` with the error's type and message, and the counts of the work done before it)
    and is re-raised. Before it starts, what killed runs of this host left behind is cleared up:
    their ``runs`` rows are finished as ``interrupted`` and their temp files removed.

    With ``register``, every one of those IDs is in the ledger, registered to this run, before
    ``work`` sends its first request: a run killed at any point leaves ``pending`` rows that
    ``retry-failed`` takes once this run is no longer alive (its heartbeat, renewed while the
    run works, stops). ``transcripts``: the counts the work's transcriptions add to.
    """
    started = time.monotonic()
    transcripts = TranscriptionCounts() if transcripts is None else transcripts
    try:
        for interrupted in store.interrupt_dead_runs(local_owner_dead):
            logger.warning("run %d was killed before it finished: marked interrupted", interrupted)
    except SQLAlchemyError as exc:
        # Housekeeping only: the run itself may still work (start_run says if it cannot).
        logger.warning("could not look for killed runs: %s", type(exc).__name__)
    await asyncio.to_thread(remove_orphan_temp_files, settings.temp_dir)
    with ledger_errors("could not start the run"):
        run_id = store.start_run(kind, params, owner=owner)
    counts = RunCounts()
    heart = asyncio.create_task(_heartbeat(store, run_id, HEARTBEAT_SECONDS))
    try:
        if register is not None:
            with ledger_errors("could not register the run's IDs"):
                await asyncio.to_thread(store.register, register, run_id=run_id)
        await work(counts)
    except BaseException as exc:
        # Our errors' messages are written for users (and redacted); another exception's
        # message may quote anything, so only its type is kept.
        reason = describe(exc) if isinstance(exc, RecarchiveError) else type(exc).__name__
        _finish_quietly(
            store, run_id, status=RunStatus.FAILED, counts=counts.as_dict(), error=reason
        )
        seconds = time.monotonic() - started
        stopped = RunReport(
            run_id, kind, RunStatus.FAILED, counts, None, seconds, reason, transcripts
        )
        _publish_metrics(settings, stopped, stopped=True)
        raise
    finally:
        heart.cancel()
    report: ExportReport | None = None
    export_error: str | None = None
    if export:
        try:
            report = export_parquet(settings, engine)
        except Exception as exc:
            export_error = f"Parquet export failed: {describe(exc)}"
            logger.error("%s; `recarchive export` redoes it", export_error)
    status = run_status(counts, transcripts) if export_error is None else RunStatus.PARTIAL
    with ledger_errors("could not finish the run"):
        store.finish_run(run_id, status=status, counts=counts.as_dict(), error=export_error)
    seconds = time.monotonic() - started
    finished = RunReport(run_id, kind, status, counts, report, seconds, export_error, transcripts)
    _publish_metrics(settings, finished)
    return finished


def _publish_metrics(settings: Settings, report: RunReport, *, stopped: bool = False) -> None:
    """Write ``RECARCHIVE_METRICS_FILE`` (if set) for a run that ended, CLI and flows alike."""
    if settings.metrics_file:
        # Imported here: run/metrics.py uses run/outcome.py, which imports this module.
        from recarchive.run.metrics import write_run_metrics

        write_run_metrics(settings.metrics_file, report, stopped=stopped)


def _finish_quietly(store: ArchiveStore, run_id: int, **values: Any) -> None:
    """Finish a failed run's row if the database lets us; never hide the run's own error."""
    try:
        store.finish_run(run_id, **values)
    except SQLAlchemyError as exc:  # the row stays running; its stopped heartbeat says dead
        logger.warning("could not record the run's end: %s", type(exc).__name__)


async def _heartbeat(store: ArchiveStore, run_id: int, every: float) -> None:
    """Keep the run's heartbeat fresh while it works (see ``ArchiveStore.due_retries``)."""
    while True:
        await asyncio.sleep(every)
        try:
            await asyncio.to_thread(store.beat, run_id)
        except SQLAlchemyError as exc:
            # The next beat may succeed; a run that cannot reach its ledger stops anyway.
            logger.warning("could not renew the run's heartbeat: %s", type(exc).__name__)


@contextlib.asynccontextmanager
async def registered_input(
    settings: Settings, ids: Iterable[str], *, kind: str, params: Mapping[str, Any]
) -> AsyncIterator[int]:
    """Register ``ids`` to a ``runs`` row that stays alive for the body (a fan-out parent).

    The parent of a fan-out backfill hands its IDs to child runs that start later; without
    this, its IDs would not be in the ledger until each child starts, and a killed parent
    would strand them. Registered here, they are left to the parent while it waits for its
    children (each child re-registers its own share), and taken by ``retry-failed`` once the
    parent is gone.

    Yields:
        The parent's run id.
    """
    engine, store = open_store(settings)
    stack = contextlib.ExitStack()
    try:
        owner = stack.enter_context(active_owner(run_owner()))
        with ledger_errors("could not start the run"):
            run_id = store.start_run(kind, dict(params), owner=owner)
        heart = asyncio.create_task(_heartbeat(store, run_id, HEARTBEAT_SECONDS))
        try:
            with ledger_errors("could not register the run's IDs"):
                requested = await asyncio.to_thread(store.register, ids, run_id=run_id)
            yield run_id
        except BaseException as exc:
            _finish_quietly(
                store,
                run_id,
                status=RunStatus.FAILED,
                counts={},
                error=describe(exc) if isinstance(exc, RecarchiveError) else type(exc).__name__,
            )
            raise
        finally:
            heart.cancel()
        with ledger_errors("could not finish the run"):
            store.finish_run(run_id, status=RunStatus.SUCCEEDED, counts={"requested": requested})
    finally:
        stack.close()
        engine.dispose()


def raise_for_export(report: RunReport) -> None:
    """Fail the caller (CLI exit 1, a failed flow run) when the run's Parquet export failed.

    Called after the run's summary or artifact is out: the items themselves are archived.

    Raises:
        StorageUnavailableError: The export failed; its message says how to redo it.
    """
    if report.export_error:
        raise StorageUnavailableError(
            f"{report.export_error}; the recordings are archived, `recarchive export` redoes it"
        )
