"""Transcriptions of archived recordings: listed at Bird, stored beside the MP3, recorded.

When a recording's media is archived (its key pinned) and its payload says
``transcription: true``, :func:`archive_transcripts` lists what Bird already has for it
(:class:`~recarchive.bird.transcriptions.TranscriptionsClient`; recarchive never asks Bird to
create one), stores each ``available`` one not ``archived`` yet as
``{stem}.transcription.{id}.json`` and, where Bird offers it, ``.txt``
(:func:`~recarchive.media.transcripts.store_transcription`), and records every one in the
``transcription_ledger``: ``archived``, ``pending`` (not ready: looked at again once due),
``failed`` (a reason; a next attempt unless the error is final) or ``unavailable`` (Bird gave
up). Recordings without transcriptions cost no request and no row.

The chunk calls it *before* the recording's ``archived`` mark: a run killed in between leaves
the recording to be redone, and the redo adopts what the killed run stored (create-only
writes of the same bytes), so every transcription is stored exactly once and never missed.
``retry-failed`` looks again at due ``pending`` and ``failed`` rows in a pass of its own
(:func:`retry_transcripts`), after the failed recordings. One recording's failure is recorded
and counted in :class:`~recarchive.model.TranscriptionCounts`, never raised: only a
:class:`~recarchive.errors.FatalError` stops the run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from recarchive.bird.transcriptions import ARCHIVED_FORMATS, Transcription, TranscriptionsClient
from recarchive.errors import (
    FatalError,
    RecarchiveError,
    RetryableError,
    TerminalError,
    first_error,
)
from recarchive.media.keys import transcription_key
from recarchive.media.locks import NO_RETENTION, Retention
from recarchive.media.spool import in_thread
from recarchive.media.transcripts import store_transcription
from recarchive.model import LedgerState, TranscriptionState
from recarchive.redaction import describe
from recarchive.run.failures import ledger_errors
from recarchive.store.transcriptions import (
    LISTING,
    StoredFormat,
    TranscriptionOutcome,
    TranscriptionRow,
)

if TYPE_CHECKING:
    from recarchive.media.s3 import MediaStore
    from recarchive.model import LedgerEntry, NormalizedRecording
    from recarchive.run.context import ArchiveContext

logger = logging.getLogger(__name__)

Job = Callable[[], Awaitable[None]]


def wants_transcripts(record: NormalizedRecording) -> bool:
    """True when the payload says the recording has a transcription."""
    return record.recording.get("transcription") is True


async def archive_transcripts(
    ctx: ArchiveContext, recording_id: str, *, bucket: str, key: str, created_at: datetime | None
) -> None:
    """Archive what Bird has of one archived recording's transcriptions, and record it.

    Args:
        ctx: The run's clients; counts go to ``ctx.transcripts``.
        recording_id: The recording.
        bucket: The bucket its MP3 is pinned to.
        key: Its MP3's key (the transcriptions go beside it).
        created_at: Its ``createdAt`` (the retention of a lock mode starts there).

    Raises:
        FatalError: The run must stop (credentials refused, database or bucket unreachable).
    """
    if ctx.media is None:
        return
    counts = ctx.transcripts
    with ledger_errors("could not read the transcription ledger"):
        rows = await asyncio.to_thread(ctx.store.transcription_rows, [recording_id])
    known = {row.transcription_id: row for row in rows.get(recording_id, [])}
    counts.recordings += 1
    try:
        listed = await TranscriptionsClient(ctx.bird).for_recording(recording_id)
    except FatalError:
        raise
    except Exception as exc:  # this recording's listing only
        await _record(ctx, [_failed(ctx, recording_id, LISTING, known.get(LISTING), exc)])
        return
    if not listed:
        counts.pending += 1
        outcome = TranscriptionOutcome(
            recording_id,
            LISTING,
            TranscriptionState.PENDING,
            error="Bird lists no transcription yet",
            retry_at=datetime.now(UTC) + ctx.media_recheck,
        )
        await _record(ctx, [outcome])
        return
    media = ctx.media.for_bucket(bucket)
    retention = ctx.media.retention.for_created(created_at) if created_at else NO_RETENTION
    outcomes: list[TranscriptionOutcome] = []
    held: bool | None = None
    for item in listed:
        row = known.get(item.id)
        if row is not None and row.state == TranscriptionState.ARCHIVED:
            counts.already_archived += 1  # stored before: no content request
            continue
        if held is None:  # read once, and only when something may be written
            with ledger_errors("could not read the legal hold"):
                holds = await asyncio.to_thread(ctx.store.legal_holds, [recording_id])
            held = recording_id in holds
        outcomes.append(await _one(ctx, media, key, item, row, retention, legal_hold=held))
    await _record(ctx, outcomes, listed=[recording_id] if LISTING in known else [])


async def _record(
    ctx: ArchiveContext, outcomes: list[TranscriptionOutcome], *, listed: list[str] | None = None
) -> None:
    with ledger_errors("could not record transcriptions"):
        await asyncio.to_thread(ctx.store.record_transcriptions, outcomes, listed=listed or [])


async def _one(
    ctx: ArchiveContext,
    media: MediaStore,
    key: str,
    item: Transcription,
    row: TranscriptionRow | None,
    retention: Retention,
    *,
    legal_hold: bool = False,
) -> TranscriptionOutcome:
    """Archive one listed transcription, or say why not."""
    counts = ctx.transcripts
    if item.problem is not None:  # malformed in the listing: looked at again, its siblings go on
        error = RetryableError(f"transcription {item.id} is malformed at Bird: {item.problem}")
        return _failed(ctx, item.recording_id, item.id, row, error)
    if item.gave_up:
        counts.unavailable += 1
        return TranscriptionOutcome(
            item.recording_id,
            item.id,
            TranscriptionState.UNAVAILABLE,
            bird_status=item.status,
            locale=item.locale,
            error=f"Bird gave up on it (status {item.status})",
        )
    if not item.ready:
        counts.pending += 1
        return TranscriptionOutcome(
            item.recording_id,
            item.id,
            TranscriptionState.PENDING,
            bird_status=item.status,
            locale=item.locale,
            error=f"not ready at Bird (status {item.status})",
            retry_at=datetime.now(UTC) + ctx.media_recheck,
        )
    client = TranscriptionsClient(ctx.bird)
    now = datetime.now(UTC)
    archived_at: datetime | None = None  # the earliest stored object's: adopted ones keep theirs
    formats: dict[str, StoredFormat] = {}
    uploaded = 0
    try:
        for fmt in ARCHIVED_FORMATS:
            data = await client.content(item.id, fmt, item.recording_id)
            if data is None:
                if fmt == "json":  # assumption 3: offered for every available one
                    raise RetryableError(f"transcription {item.id}: Bird offers no .json yet")
                continue  # .txt where Bird offers it
            stored = await in_thread(
                store_transcription,
                media,
                transcription_key(key, item.id, fmt),
                data,
                fmt=fmt,
                locale=item.locale,
                retention=retention,
                archived_at=now,
                legal_hold=legal_hold,
            )
            formats[fmt] = StoredFormat(stored.key, stored.size, stored.sha256)
            uploaded += stored.size if stored.outcome == "uploaded" else 0
            stored_at = stored.archived_at or now
            archived_at = stored_at if archived_at is None else min(archived_at, stored_at)
    except FatalError:
        raise
    except Exception as exc:  # this transcription's failure, whatever raised it
        # What was stored already stays recorded (verify and erase see it; the next look
        # adopts it).
        return _failed(ctx, item.recording_id, item.id, row, exc, item, formats=formats)
    counts.archived += 1
    counts.bytes_uploaded += uploaded
    return TranscriptionOutcome(
        item.recording_id,
        item.id,
        TranscriptionState.ARCHIVED,
        bucket=media.bucket,
        bird_status=item.status,
        locale=item.locale,
        formats=formats,
        archived_at=archived_at or now,
    )


def _failed(
    ctx: ArchiveContext,
    recording_id: str,
    transcription_id: str,
    row: TranscriptionRow | None,
    exc: Exception,
    item: Transcription | None = None,
    *,
    formats: Mapping[str, StoredFormat] | None = None,
) -> TranscriptionOutcome:
    """A ``failed`` outcome with a redacted reason and, unless final, a next attempt."""
    error = describe(exc)
    what = "listing" if transcription_id == LISTING else transcription_id
    ctx.transcripts.record_failure(recording_id, f"transcription {what}: {error}")
    if not isinstance(exc, RecarchiveError):
        logger.debug("transcriptions of %s: unexpected error", recording_id, exc_info=exc)
    retry_at: datetime | None = None
    if not isinstance(exc, TerminalError):
        attempts = (row.attempts if row is not None else 0) + 1
        delay = ctx.retry_backoff * (2 ** min(attempts - 1, 10))
        retry_at = datetime.now(UTC) + min(delay, timedelta(days=1))
    logger.warning("transcription %s of recording %s failed: %s", what, recording_id, error)
    return TranscriptionOutcome(
        recording_id,
        transcription_id,
        TranscriptionState.FAILED,
        error=error,
        retry_at=retry_at,
        bird_status=item.status if item is not None else None,
        locale=item.locale if item is not None else None,
        formats=dict(formats or {}),
    )


def refresh_jobs(
    ctx: ArchiveContext,
    records: Iterable[NormalizedRecording],
    entries: Mapping[str, LedgerEntry],
) -> list[Job]:
    """``--refresh`` of archived recordings: look at their transcriptions again.

    Only those whose payload says ``transcription: true``; stored ones cost no content
    request (their rows say ``archived``).
    """
    jobs: list[Job] = []
    for record in records:
        entry = entries[record.id]
        if entry.state != LedgerState.ARCHIVED or not wants_transcripts(record):
            continue
        if entry.s3_bucket is None or entry.s3_key is None:
            continue

        async def job(record: NormalizedRecording = record, entry: LedgerEntry = entry) -> None:
            assert entry.s3_bucket is not None and entry.s3_key is not None
            await archive_transcripts(
                ctx,
                record.id,
                bucket=entry.s3_bucket,
                key=entry.s3_key,
                created_at=record.created_at,
            )

        jobs.append(job)
    return jobs


async def retry_transcripts(ctx: ArchiveContext, *, batch: int = 500) -> None:
    """``retry-failed``'s own pass: every recording with a due ``pending``/``failed`` row.

    Each recording is looked at once per run (a look that does not archive schedules the
    next one later); at most ``ctx.concurrency`` at once.

    Raises:
        FatalError: The run must stop.
    """
    if ctx.media is None:
        return
    seen: set[str] = set()
    limit = asyncio.Semaphore(ctx.concurrency)

    async def one(recording_id: str, target: tuple[str, str, datetime]) -> None:
        bucket, key, created_at = target
        async with limit:
            # The recording's lease, as every run that works on a recording takes it: an
            # ``erase`` meanwhile waits for it (or has made the row a tombstone, which is never
            # leased), and a second retry-failed skips what this one does.
            with ledger_errors("could not lease a recording for its transcriptions"):
                claimed = await asyncio.to_thread(
                    ctx.store.claim,
                    [recording_id],
                    owner=ctx.owner,
                    lease_seconds=ctx.lease_seconds,
                    states=[LedgerState.ARCHIVED.value],
                )
            if not claimed:
                return  # another run holds it, or it is no longer archived
            try:
                await archive_transcripts(
                    ctx, recording_id, bucket=bucket, key=key, created_at=created_at
                )
            finally:
                with ledger_errors("could not release a recording's lease"):
                    await asyncio.to_thread(ctx.store.release, [recording_id], owner=ctx.owner)

    while True:
        due = [
            recording_id
            for recording_id in await asyncio.to_thread(
                ctx.store.due_transcriptions,
                limit=batch + len(seen),
                max_attempts=ctx.item_max_attempts,
            )
            if recording_id not in seen
        ][:batch]
        if not due:
            return
        seen.update(due)
        targets = await asyncio.to_thread(ctx.store.transcription_targets, due)
        try:
            async with asyncio.TaskGroup() as group:
                for recording_id, target in targets.items():
                    group.create_task(one(recording_id, target))
        except BaseExceptionGroup as group_error:
            raise first_error(group_error) from None
