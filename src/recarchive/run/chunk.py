"""One chunk of recording IDs end to end: ledger claim, metadata, SQL, media, ledger marks.

:func:`archive_chunk` is the unit that Prefect tasks wrap and that the CLI calls directly. It
holds at most one chunk of payloads in memory, and runs its items concurrently with asyncio,
bounded by the context's ``concurrency``. Its SQL work goes in batches, in threads: one metadata
write, one pin of all media items' S3 keys before their transfers start, and the items' marks
(:class:`~recarchive.run.marks.MarkBatch`: an item counts once its mark is confirmed).
Retries of single HTTP requests happen in the Bird client only; an item that still fails is
marked ``failed`` with its next attempt's time (backoff across runs), and the run goes on.
Only a :class:`FatalError` (bad credentials, unreachable ledger database, a full disk) stops
the chunk, after marking what finished and releasing its leases. A recording's
transcriptions are archived before its ``archived`` mark (:mod:`recarchive.run.transcripts`).

One bad recording never stops the others: every exception raised while processing one item
ends that item ``failed`` with a redacted ``last_error`` (in :meth:`_Chunk._fetch_metadata`,
:meth:`_Chunk._save_metadata` and :meth:`_Chunk._archive_media`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from recarchive.errors import (
    FatalError,
    MediaConflictError,
    NotFoundError,
    PayloadError,
    RecarchiveError,
    RetryableError,
    StorageUnavailableError,
    first_error,
)
from recarchive.leases import release_dead_leases
from recarchive.media.keys import media_key
from recarchive.media.transfer import archive_media
from recarchive.model import CLAIMABLE_STATES, WORK_STATES, LedgerState, RunCounts, skip_counter
from recarchive.normalize import normalize_recording
from recarchive.redaction import describe
from recarchive.run.context import ArchiveContext, ChunkOptions, ProgressCallback
from recarchive.run.failures import (
    DISK_ERRNOS,
    RowsRefused,
    database_is_down,
    ledger_errors,
)
from recarchive.run.marks import MarkBatch
from recarchive.run.transcripts import archive_transcripts, refresh_jobs, wants_transcripts
from recarchive.store.outcomes import Outcome

if TYPE_CHECKING:
    from recarchive.model import LedgerEntry, NormalizedRecording

logger = logging.getLogger(__name__)

T = TypeVar("T")

AVAILABLE = "available"


async def archive_chunk(
    ctx: ArchiveContext,
    ids: Sequence[str],
    options: ChunkOptions = ChunkOptions(),
    on_progress: ProgressCallback | None = None,
) -> RunCounts:
    """Archive one chunk of distinct, valid recording IDs.

    Args:
        ctx: Clients and settings.
        ids: Canonical recording IDs, no duplicates.
        options: ``skip_media`` / ``refresh``.
        on_progress: Called with a small :class:`RunCounts` delta per finished item.

    Returns:
        The chunk's counts.

    Raises:
        FatalError: The run must stop (credentials refused, store unreachable). Leases taken
            by this chunk are released first, so the next run picks the items up at once.
    """
    chunk = _Chunk(ctx, options, on_progress)
    return await chunk.run(ids)


class _Chunk:
    """State of one :func:`archive_chunk` call."""

    def __init__(
        self, ctx: ArchiveContext, options: ChunkOptions, on_progress: ProgressCallback | None
    ) -> None:
        self.ctx = ctx
        self.options = options
        self.on_progress = on_progress
        self.counts = RunCounts()
        self.limit = asyncio.Semaphore(ctx.concurrency)
        # IDs whose ledger row this chunk created (see _register).
        self.fresh: set[str] = set()
        self.entries: dict[str, LedgerEntry] = {}
        self.marks = MarkBatch(ctx.store, ctx.owner, functools.partial(self._outcome, busy=1))

    def _outcome(self, **delta: int) -> None:
        step = RunCounts()
        for name, value in delta.items():
            setattr(step, name, value)
        self.counts.add(step)
        if self.on_progress is not None:
            self.on_progress(step)

    def _fail(self, recording_id: str, error: str) -> None:
        self.counts.record_failure(recording_id, error)
        # record_failure counted it already; the delta below only feeds progress displays.
        if self.on_progress is not None:
            self.on_progress(RunCounts(failed=1))

    async def run(self, ids: Sequence[str]) -> RunCounts:
        self.counts.requested = len(ids)
        store, ctx = self.ctx.store, self.ctx
        with ledger_errors("could not read the ledger"):
            entries = await asyncio.to_thread(self._register, ids)
        wanted: list[str] = []
        for recording_id in ids:
            # archived and missing (unless --refresh) and erased (always): no request at all.
            skipped = skip_counter(entries[recording_id].state, refresh=self.options.refresh)
            if skipped is not None:
                self._outcome(**{skipped: 1})
            else:
                wanted.append(recording_id)
        if not wanted:
            return self.counts
        with ledger_errors("could not take over dead leases"):
            release_dead_leases(
                (entries[recording_id] for recording_id in wanted),
                store.release,
                own_owner=ctx.owner,
            )
        states = CLAIMABLE_STATES if self.options.refresh else WORK_STATES
        with ledger_errors("could not claim"):
            claimed = store.claim(
                wanted, owner=ctx.owner, lease_seconds=ctx.lease_seconds, states=states
            )
        busy = len(wanted) - len(claimed)
        if busy:
            logger.info("%d recordings are leased by another run; left to it", busy)
            self._outcome(busy=busy)
        renewer = asyncio.create_task(self._renew_leases(claimed))
        try:
            async with self.marks:  # what finished is marked before the leases go
                await self._process(claimed, entries)
        finally:
            renewer.cancel()
            # Items whose mark was applied no longer hold a lease; this frees the rest (a fatal
            # error or a cancellation) so the next run does not wait for the lease to expire.
            try:
                store.release(claimed, owner=ctx.owner)
            except Exception:
                logger.exception("could not release leases; they expire on their own")
        return self.counts

    async def _renew_leases(self, claimed: list[str]) -> None:
        """Keep this chunk's leases alive while it works (every third of their length)."""
        ctx = self.ctx
        while True:
            await asyncio.sleep(ctx.lease_seconds / 3)
            try:
                await asyncio.to_thread(
                    ctx.store.renew, claimed, owner=ctx.owner, lease_seconds=ctx.lease_seconds
                )
            except SQLAlchemyError as exc:
                # The next renewal may succeed; marks still check the lease either way.
                logger.warning("could not renew leases: %s", type(exc).__name__)

    def _register(self, ids: Sequence[str]) -> dict[str, LedgerEntry]:
        """Return the ledger rows of ``ids``, inserting ``pending`` rows for new IDs.

        Rows that cannot have an object of an earlier run behind them are remembered in
        ``fresh``: ``pending``, never attempted, unleased, without a pinned S3 key (every
        upload pins its key first). For those the S3 check for a crashed run's object is
        skipped (a create-only upload that meets one anyway compares hashes: a wrong guess
        costs a download, never a duplicate).
        """
        store = self.ctx.store
        entries = store.get_entries(ids)
        new = [recording_id for recording_id in ids if recording_id not in entries]
        if new:
            store.register(new)
            entries.update(store.get_entries(new))
        self.fresh = {
            recording_id
            for recording_id, entry in entries.items()
            if entry.state == LedgerState.PENDING
            and entry.attempts == 0
            and entry.lease_owner is None
            and entry.s3_key is None
        }
        return entries

    async def _process(self, claimed: list[str], entries: dict[str, LedgerEntry]) -> None:
        self.entries = entries
        fetched = await self._gather(
            functools.partial(self._fetch_metadata, rid, entries[rid]) for rid in claimed
        )
        records = await self._save_metadata([record for record in fetched if record is not None])
        if not records:
            return
        to_archive: list[tuple[NormalizedRecording, LedgerEntry]] = []
        for record in records:
            entry = entries[record.id]
            if entry.state == LedgerState.ARCHIVED:  # --refresh: metadata updated, not media
                self._outcome(already_archived=1)
            elif self.options.skip_media or record.status != AVAILABLE or self.ctx.media is None:
                if self.options.skip_media:
                    reason, recheck_at = "skip-media", None
                else:  # media not ready: retry-failed looks again once this is due
                    reason = f"status {record.status}"
                    recheck_at = datetime.now(UTC) + self.ctx.media_recheck
                await self.marks.add(
                    Outcome.metadata_only(record.id, reason=reason, retry_at=recheck_at),
                    functools.partial(self._outcome, metadata_only=1),
                )
            else:
                to_archive.append((record, entry))
        pinned = await self._pin_keys(to_archive) if to_archive else {}
        await self._gather(
            functools.partial(self._archive_media, record, entry, *pinned[record.id])
            for record, entry in to_archive
            if record.id in pinned
        )
        await self._gather(refresh_jobs(self.ctx, records, entries) if self.options.refresh else [])

    async def _pin_keys(
        self, items: list[tuple[NormalizedRecording, LedgerEntry]]
    ) -> dict[str, tuple[str, str, str]]:
        """Pin the media items' S3 keys, committed before any transfer starts.

        Returns ``(bucket, key)`` as pinned and the key ``createdAt`` gives now, per item whose
        key is pinned; items whose lease another run took over count ``busy``.
        """
        media, ctx = self.ctx.media, self.ctx
        assert media is not None
        wanted: dict[str, str] = {}
        for record, entry in items:
            try:
                wanted[record.id] = media_key(
                    ctx.s3_prefix, ctx.workspace_id, record.id, record.created_at
                )
            except Exception as exc:  # one recording's failure, whatever raised it
                await self._failed(record.id, entry, exc)
        with ledger_errors("could not pin the S3 keys"):
            pinned = await asyncio.to_thread(
                ctx.store.pin_keys, wanted, owner=ctx.owner, bucket=media.bucket
            )
        for recording_id in wanted.keys() - pinned.keys():
            logger.warning("ledger refused the key of %s: not leased by this run", recording_id)
            self._outcome(busy=1)
        return {rid: (*pinned[rid], wanted[rid]) for rid in wanted if rid in pinned}

    async def _save_metadata(self, records: list[NormalizedRecording]) -> list[NormalizedRecording]:
        """Save the chunk's metadata in one transaction; return the records saved.

        When the rows are refused for their content (not because the database is down),
        each record is saved alone and those still refused end ``failed``: one recording the
        database cannot hold never keeps the others of its chunk ``pending``.
        """
        if not records:
            return records
        try:
            await asyncio.to_thread(self._write_metadata, records)
            return records
        except RowsRefused as refused:
            logger.warning(
                "a batch of %d recordings was refused (%s); saving them one by one",
                len(records),
                type(refused.__cause__).__name__,
            )
        saved: list[NormalizedRecording] = []
        for record in records:
            try:
                await asyncio.to_thread(self._write_metadata, [record])
            except RowsRefused as refused:
                cause = refused.__cause__
                await self._failed(
                    record.id,
                    self.entries[record.id],
                    cause if isinstance(cause, Exception) else refused,
                )
                continue
            saved.append(record)
        return saved

    def _write_metadata(self, records: list[NormalizedRecording]) -> None:
        try:
            self.ctx.store.save_metadata(records)
        except SQLAlchemyError as exc:
            if database_is_down(exc):
                raise StorageUnavailableError(
                    f"could not save metadata: {type(exc).__name__}"
                ) from exc
            raise RowsRefused from exc
        except Exception as exc:  # a driver's ValueError, a bug: about these rows only
            raise RowsRefused from exc

    async def _gather(self, jobs: Iterable[Callable[[], Awaitable[T]]]) -> list[T]:
        """Run jobs with at most ``concurrency`` in flight; a fatal error cancels all.

        Each job is a factory called when its turn comes: a job cancelled before it started
        (a sibling's fatal error) then leaves no coroutine that was never awaited.
        """

        async def bounded(job: Callable[[], Awaitable[T]]) -> T:
            async with self.limit:
                return await job()

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(bounded(job)) for job in jobs]
        except BaseExceptionGroup as group_error:
            raise first_error(group_error) from None
        return [task.result() for task in tasks]

    async def _fetch_metadata(
        self, recording_id: str, entry: LedgerEntry
    ) -> NormalizedRecording | None:
        try:
            payload = await self.ctx.bird.get_recording(recording_id)
            record = normalize_recording(
                payload, workspace_id=self.ctx.workspace_id, fetched_at=datetime.now(UTC)
            )
            if record.id != recording_id:
                raise PayloadError(
                    f"asked for recording {recording_id}, the API answered with {record.id}",
                    field="id",
                )
            return record
        except NotFoundError as exc:
            if entry.state == LedgerState.ARCHIVED:
                # --refresh after Bird deleted its copy: ours is the archive; keep it as it is.
                self._outcome(already_archived=1)
            else:
                await self.marks.add(
                    Outcome.missing(recording_id, error=str(exc)),
                    functools.partial(self._outcome, missing=1),
                )
        except FatalError:
            raise
        except Exception as exc:  # one recording's failure, whatever raised it
            if entry.state == LedgerState.ARCHIVED:
                # A failed refresh does not undo an archived recording; report it only.
                self._fail(recording_id, f"refresh failed: {describe(exc)}")
            else:
                await self._failed(recording_id, entry, exc)
        return None

    async def _archive_media(
        self, record: NormalizedRecording, entry: LedgerEntry, bucket: str, key: str, wanted: str
    ) -> None:
        media = self.ctx.media
        assert media is not None
        try:
            if key != wanted or bucket != media.bucket:
                pinned = f"s3://{bucket}/{key}"
                logger.info("media of %s stays at pinned %s (not %s)", record.id, pinned, wanted)
                media = media.for_bucket(bucket)
            sidecar = json.dumps(record.redacted_payload, sort_keys=True).encode()
            result = await archive_media(
                self.ctx.bird,
                media,
                recording_id=record.id,
                key=key,
                sidecar=sidecar,
                temp_dir=self.ctx.temp_dir,
                attempts=self.ctx.media_attempts,
                retry_delay=self.ctx.media_retry_delay,
                # A row this run created cannot have an object of a crashed run behind it.
                check_existing=record.id not in self.fresh,
                created_at=record.created_at,  # retain-until is createdAt + days
            )
            uploaded = result.outcome == "uploaded"
            if wants_transcripts(record):  # before the mark: a killed run's redo does them
                await archive_transcripts(
                    self.ctx, record.id, bucket=bucket, key=key, created_at=record.created_at
                )
        except FatalError:
            raise
        except NotFoundError as exc:
            # The metadata said ``available`` a moment ago: a 404 for its media is Bird's
            # media store lagging behind, not a missing recording. Retried with backoff.
            await self._failed(record.id, entry, exc, retryable=True)
            return
        except OSError as exc:
            if exc.errno not in DISK_ERRNOS:
                await self._failed(record.id, entry, exc)
                return
            # The local disk (full, over quota, read-only): every other item would fail the
            # same way, so the run stops instead of failing items one by one.
            raise StorageUnavailableError(
                f"cannot write media temp files in {self.ctx.temp_dir or 'the temp folder'}: "
                f"{exc.strerror or type(exc).__name__}"
            ) from exc
        except Exception as exc:  # one recording's failure, whatever raised it
            await self._failed(record.id, entry, exc)
            return
        await self.marks.add(
            Outcome.archived(
                record.id,
                bucket=result.bucket,
                key=result.key,
                size_bytes=result.size_bytes,
                sha256=result.sha256,
                lock_mode=result.retention.mode,
                retain_until=result.retention.retain_until,
                archived_at=result.archived_at,
            ),
            functools.partial(
                self._outcome, archived=1, bytes_uploaded=result.size_bytes if uploaded else 0
            ),
        )

    async def _failed(
        self, recording_id: str, entry: LedgerEntry, exc: Exception, *, retryable: bool = False
    ) -> None:
        """Mark one recording ``failed`` with a redacted reason and, unless final, a retry time.

        Our terminal errors are final; retryable ones and anything unexpected (a library's
        own exception: it may be transient, and retrying is bounded by the attempt count) get
        a backoff.
        """
        error = describe(exc)
        attempts = entry.attempts + 1
        retry_at: datetime | None = None
        if not isinstance(exc, RecarchiveError):
            logger.debug("recording %s: unexpected error", recording_id, exc_info=exc)
        retryable = (
            retryable or isinstance(exc, RetryableError) or not isinstance(exc, RecarchiveError)
        )
        if retryable and not isinstance(exc, MediaConflictError):
            delay = self.ctx.retry_backoff * (2 ** min(attempts - 1, 10))
            retry_at = datetime.now(UTC) + min(delay, timedelta(days=1))
        logger.warning("recording %s failed (attempt %d): %s", recording_id, attempts, error)
        await self.marks.add(
            Outcome.failed(recording_id, error=error, retry_at=retry_at),
            functools.partial(self._fail, recording_id, error),
        )
