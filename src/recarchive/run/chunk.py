"""One chunk of recording IDs end to end: ledger claim, metadata, SQL, media, ledger marks.

:func:`archive_chunk` is the unit that Prefect tasks wrap and that the CLI calls directly. It
holds at most one chunk of payloads in memory, and runs its items concurrently with asyncio,
bounded by the context's ``concurrency``. Retries of single HTTP requests happen in the Bird
client only; here an item that still fails is marked ``failed`` in the ledger with the time of
its next attempt (backoff across runs), and the run goes on. Only a :class:`FatalError`
(bad credentials, unreachable ledger database, a full disk) stops the chunk, after releasing
its leases.

One bad recording never stops the others: every exception raised while processing one item —
parsing, redirect, transport, its storage, a bug in a library — ends that item ``failed``
with a redacted ``last_error``. The places that do so are :meth:`_Chunk._fetch_metadata`,
:meth:`_Chunk._save_metadata` and :meth:`_Chunk._archive_media`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from recarchive.errors import (
    FatalError,
    LedgerStateError,
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
from recarchive.model import LEDGER_STATES, WORK_STATES, LedgerState, RunCounts
from recarchive.normalize import normalize_recording
from recarchive.redaction import describe

if TYPE_CHECKING:
    from recarchive.bird.client import BirdClient
    from recarchive.media.s3 import MediaStore
    from recarchive.model import LedgerEntry, NormalizedRecording
    from recarchive.store.archive import ArchiveStore

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[RunCounts], None]
T = TypeVar("T")

ALL_STATES = frozenset(LEDGER_STATES)
AVAILABLE = "available"


@dataclass(frozen=True)
class ChunkOptions:
    """What the caller asked for.

    Attributes:
        skip_media: Fetch and store metadata only; the ledger says ``metadata_only``.
        refresh: Re-fetch metadata even of ``archived`` and ``missing`` recordings (their
            stored media is never transferred again).
    """

    skip_media: bool = False
    refresh: bool = False


@dataclass
class ArchiveContext:
    """The clients and knobs one process uses for every chunk (built by ``run.clients``).

    Attributes:
        bird: Bird API client (owns retries and request pacing).
        store: SQL store and ledger.
        media: S3 media store, or ``None`` when the run skips media.
        workspace_id: Bird workspace of every ID.
        s3_prefix: Key prefix of media objects.
        owner: This run's lease owner name (unique per run).
        concurrency: Items in flight at once within a chunk.
        lease_seconds: Lease length of claimed ledger rows.
        item_max_attempts: Attempts (across runs) after which a failure is no longer retried.
        retry_backoff: Base delay before a failed item's next attempt (doubles per attempt).
        media_recheck: Delay before ``retry-failed`` looks again at a recording whose media
            was not available yet.
        temp_dir: Folder for media temp files (system default when ``None``).
        media_attempts: Whole downloads tried per recording when a body breaks off or
            fails verification.
        media_retry_delay: First delay between those downloads (doubles, capped).
    """

    bird: BirdClient
    store: ArchiveStore
    media: MediaStore | None
    workspace_id: str
    s3_prefix: str
    owner: str
    concurrency: int = 16
    lease_seconds: int = 900
    item_max_attempts: int = 8
    retry_backoff: timedelta = timedelta(minutes=5)
    media_recheck: timedelta = timedelta(hours=1)
    temp_dir: Path | None = None
    media_attempts: int = 3
    media_retry_delay: float = 0.25


#: errno values of the local disk that every other item would meet as well: stop the run.
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def _database_is_down(exc: SQLAlchemyError) -> bool:
    """True when a failed write says the database itself is the problem (stop the run).

    Operational and interface errors, and any error that invalidated the connection, are the
    database's; other DBAPI errors (a value a column cannot hold, a constraint) and errors
    raised while binding parameters are about the rows written.
    """
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


class _RowsRefused(Exception):
    """The database (or its driver) refused rows for their content; ``__cause__`` says how."""


@contextlib.contextmanager
def ledger_errors(action: str) -> Iterator[None]:
    """Translate a database failure into the fatal error that stops the run cleanly.

    Only the error's type is kept: driver messages can quote connection details.
    """
    try:
        yield
    except SQLAlchemyError as exc:
        raise StorageUnavailableError(f"{action}: {type(exc).__name__}") from exc


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
            entries = self._register(ids)
        wanted: list[str] = []
        for recording_id in ids:
            state = entries[recording_id].state
            if state == LedgerState.ARCHIVED and not self.options.refresh:
                self._outcome(already_archived=1)
            elif state == LedgerState.MISSING and not self.options.refresh:
                self._outcome(missing=1)
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
        states = ALL_STATES if self.options.refresh else WORK_STATES
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
            await self._process(claimed, entries)
        finally:
            renewer.cancel()
            # Items that reached a mark_* no longer hold a lease; this frees the rest (a fatal
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
        ``fresh``: ``pending``, never attempted, unleased, and without a pinned S3 key (every
        upload pins its key first, so no upload of this release ever started for them; a
        killed run of an older release leaves its lease behind). For those the S3 check for
        a crashed run's object is skipped (a create-only upload that meets an object anyway
        compares hashes, so a wrong guess costs a download, never a duplicate).
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
        records = self._save_metadata([record for record in fetched if record is not None])
        if not records:
            return
        to_archive: list[tuple[NormalizedRecording, LedgerEntry]] = []
        for record in records:
            entry = entries[record.id]
            if entry.state == LedgerState.ARCHIVED:
                # --refresh of an archived recording: metadata updated above, media untouched.
                self._outcome(already_archived=1)
            elif self.options.skip_media or record.status != AVAILABLE or self.ctx.media is None:
                if self.options.skip_media:
                    reason, recheck_at = "skip-media", None
                else:
                    # Media not ready: retry-failed looks again once this is due.
                    reason = f"status {record.status}"
                    recheck_at = datetime.now(UTC) + self.ctx.media_recheck
                marked = self._mark(
                    record.id,
                    entry,
                    self.ctx.store.mark_metadata_only,
                    reason=reason,
                    retry_at=recheck_at,
                )
                if marked:  # else counted busy: another run took the lease over
                    self._outcome(metadata_only=1)
            else:
                to_archive.append((record, entry))
        await self._gather(
            functools.partial(self._archive_media, record, entry) for record, entry in to_archive
        )

    def _save_metadata(self, records: list[NormalizedRecording]) -> list[NormalizedRecording]:
        """Save the chunk's metadata in one transaction; return the records saved.

        When the rows are refused for their content (not because the database is down),
        each record is saved alone and those still refused end ``failed``: one recording the
        database cannot hold never keeps the others of its chunk ``pending``.
        """
        if not records:
            return records
        try:
            self._write_metadata(records)
            return records
        except _RowsRefused as refused:
            logger.warning(
                "a batch of %d recordings was refused (%s); saving them one by one",
                len(records),
                type(refused.__cause__).__name__,
            )
        saved: list[NormalizedRecording] = []
        for record in records:
            try:
                self._write_metadata([record])
            except _RowsRefused as refused:
                cause = refused.__cause__
                self._failed(
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
            if _database_is_down(exc):
                raise StorageUnavailableError(
                    f"could not save metadata: {type(exc).__name__}"
                ) from exc
            raise _RowsRefused from exc
        except Exception as exc:  # a driver's ValueError, a bug: about these rows only
            raise _RowsRefused from exc

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
        store = self.ctx.store
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
            elif self._mark(recording_id, entry, store.mark_missing, error=str(exc)):
                self._outcome(missing=1)
        except FatalError:
            raise
        except Exception as exc:  # one recording's failure, whatever raised it
            if entry.state == LedgerState.ARCHIVED:
                # A failed refresh does not undo an archived recording; report it only.
                self._fail(recording_id, f"refresh failed: {describe(exc)}")
            else:
                self._failed(recording_id, entry, exc)
        return None

    async def _archive_media(self, record: NormalizedRecording, entry: LedgerEntry) -> None:
        media = self.ctx.media
        assert media is not None
        try:
            wanted = media_key(
                self.ctx.s3_prefix, self.ctx.workspace_id, record.id, record.created_at
            )
            with ledger_errors("could not pin the S3 key"):
                bucket, key = await asyncio.to_thread(
                    self.ctx.store.pin_key,
                    record.id,
                    owner=self.ctx.owner,
                    bucket=media.bucket,
                    key=wanted,
                )
            if key != wanted or bucket != media.bucket:
                logger.info(
                    "media of %s stays at its pinned key s3://%s/%s (now it would be %s)",
                    record.id,
                    bucket,
                    key,
                    wanted,
                )
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
            )
            uploaded = result.outcome == "uploaded"
        except LedgerStateError as exc:
            logger.warning("ledger refused the key of %s: %s", record.id, exc)
            self._outcome(busy=1)
            return
        except FatalError:
            raise
        except NotFoundError as exc:
            # The metadata said ``available`` a moment ago: a 404 for its media is Bird's
            # media store lagging behind, not a missing recording. Retried with backoff.
            self._failed(record.id, entry, exc, retryable=True)
            return
        except OSError as exc:
            if exc.errno not in _DISK_ERRNOS:
                self._failed(record.id, entry, exc)
                return
            # The local disk (full, over quota, read-only): every other item would fail the
            # same way, so the run stops instead of failing items one by one.
            raise StorageUnavailableError(
                f"cannot write media temp files in {self.ctx.temp_dir or 'the temp folder'}: "
                f"{exc.strerror or type(exc).__name__}"
            ) from exc
        except Exception as exc:  # one recording's failure, whatever raised it
            self._failed(record.id, entry, exc)
            return
        marked = self._mark(
            record.id,
            entry,
            self.ctx.store.mark_archived,
            bucket=result.bucket,
            key=result.key,
            size_bytes=result.size_bytes,
            sha256=result.sha256,
        )
        if marked:
            self._outcome(archived=1, bytes_uploaded=result.size_bytes if uploaded else 0)

    def _failed(
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
        if self._mark(
            recording_id, entry, self.ctx.store.mark_failed, error=error, retry_at=retry_at
        ):
            self._fail(recording_id, error)

    def _mark(
        self, recording_id: str, entry: LedgerEntry, mark: Callable[..., None], **kwargs: object
    ) -> bool:
        """Apply a ledger transition; ``False`` when another run took the lease over."""
        try:
            with ledger_errors("could not update the ledger"):
                mark(recording_id, owner=self.ctx.owner, **kwargs)
        except LedgerStateError as exc:
            logger.warning("ledger refused %s for %s: %s", mark.__name__, recording_id, exc)
            self._outcome(busy=1)
            return False
        return True
