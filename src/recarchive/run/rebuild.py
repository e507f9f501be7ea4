"""``rebuild``: the SQL tables and the Parquet dataset again, from the S3 archive alone.

For the day the database is gone. Every recording the archive holds (an MP3 with its sidecar)
becomes its ``recordings`` and ``recording_parties`` rows again — the sidecar is the redacted
payload the run normalized, and normalizing it again gives the same rows — and an ``archived``
ledger row with the key, size and SHA-256 the object carries, and when it was stored. Then the
Parquet dataset is exported whole. Nothing is written to S3 and nothing is asked of Bird.

What the archive cannot say is left to the next run: recordings whose media was not archived
yet were never in S3 (a run fetches them again like any new ID); an MP3 without its sidecar (a
run killed between the two writes) is listed and registered ``pending`` at its key, and the
next run that takes it adopts the object after checking its bytes, as recovery always does.

A recording's transcription objects (``{id}.transcription.{transcriptionId}.json`` and
``.txt``) become ``archived`` rows of the ``transcription_ledger`` again, with the key, size,
SHA-256, ``archived-at`` and ``locale`` their metadata carries.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TypeVar

from recarchive.config import Settings
from recarchive.errors import ConfigError, RecarchiveError, StorageUnavailableError
from recarchive.export.parquet import ExportReport, partition_files
from recarchive.leases import run_owner
from recarchive.media.inventory import StoredRecording, iter_recordings, media_facts, read_json
from recarchive.media.keys import workspace_prefix
from recarchive.media.objects import object_info
from recarchive.media.s3 import MediaStore
from recarchive.media.transcripts import LOCALE
from recarchive.model import (
    LedgerEntry,
    LedgerState,
    NormalizedRecording,
    RunStatus,
    TranscriptionState,
)
from recarchive.normalize import normalize_recording
from recarchive.redaction import describe
from recarchive.run.clients import build_media_store
from recarchive.run.database import open_store, safe_database_url
from recarchive.run.parquet import export_parquet
from recarchive.run.transcripts import wants_transcripts
from recarchive.store.archive import ArchiveStore
from recarchive.store.erasures import tombstone_reason
from recarchive.store.transcriptions import LISTING, StoredFormat, TranscriptionOutcome

logger = logging.getLogger(__name__)

T = TypeVar("T")
_TRANSCRIPTION = re.compile(
    r"\.transcription\.(?P<id>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
    r"\.(?P<fmt>json|txt)$"
)
BATCH = 200
#: The ``runs`` kind of a rebuild.
REBUILD = "rebuild"


@dataclass
class RebuildReport:
    """What a rebuild found and wrote.

    Attributes:
        recordings: Recordings rebuilt (metadata rows and an ``archived`` ledger row each).
        erased: Tombstones restored (``erased`` ledger rows, from ``.erased.json``).
        bytes: Their MP3s' total size.
        without_sidecar: IDs with an MP3 but no sidecar: registered ``pending`` at their key,
            so the next run given them (or ``retry-failed``) adopts the object.
        skipped: ``(id, why)`` of objects that could not be rebuilt (an unreadable sidecar, an
            MP3 without ``sha256`` metadata or not matching it, a sidecar without its MP3).
        export: The Parquet export that followed.
        first_created: The earliest ``createdAt`` rebuilt (recordings never archived from
            then on are not in S3: listing the window again finds them).
        last_created: The latest.
        unhashed: ``(id, why)`` of MP3s ``--verify`` could not read (an archive storage class):
            their metadata is trusted; ``verify --restore`` makes them readable.
    """

    recordings: int = 0
    erased: int = 0
    bytes: int = 0
    without_sidecar: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    export: ExportReport | None = None
    first_created: datetime | None = None
    last_created: datetime | None = None
    unhashed: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _Found:
    record: NormalizedRecording | None  # None: an MP3 without its sidecar
    entry: LedgerEntry
    #: The Object Lock columns the object's HEAD gives (lock_mode, retain_until, legal_hold).
    lock: dict[str, object] = field(default_factory=dict)
    #: Its archived transcriptions, as their objects tell.
    transcriptions: list[TranscriptionOutcome] = field(default_factory=list)


def rebuild(
    settings: Settings,
    *,
    verify: bool = False,
    overwrite_parquet: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> RebuildReport:
    """Rebuild SQL and Parquet from the S3 archive into an empty database.

    A rebuild that stopped (a lost connection, a kill) is continued by running it again: the
    database then holds only what that rebuild wrote, its ``runs`` row says so, and rows
    already written are kept.

    Args:
        settings: Database, bucket, prefix and workspace of the archive.
        verify: Hash every MP3 and compare it with its ``sha256`` metadata before it counts
            as archived (a full read of the archive); without it the metadata is trusted, as
            ``verify`` without ``--deep`` does.
        overwrite_parquet: Export even when the Parquet root holds files already.
        on_progress: Called with the number of recordings looked at so far, per batch.

    Raises:
        ConfigError: Bucket or workspace unset, the database is not empty, or the Parquet
            root holds a dataset and ``overwrite_parquet`` is not set.
        StorageUnavailableError: S3 or the database cannot be reached.
    """
    bucket = settings.require_bucket()
    if not settings.workspace_id:
        raise ConfigError("missing required setting: RECARCHIVE_WORKSPACE_ID")
    workspace = settings.workspace_id
    engine, store = open_store(settings)
    try:
        continuing = _check_empty(store, settings)
        if not (overwrite_parquet or continuing):  # a continued rebuild may have exported
            _check_no_dataset(settings)
        run_id = store.start_run(REBUILD, {"bucket": bucket, "verify": verify}, owner=run_owner())
        report = RebuildReport()
        try:
            _restore(
                settings,
                store,
                build_media_store(settings, bucket=bucket),
                workspace,
                verify,
                report,
                on_progress,
            )
            report.export = export_parquet(settings, engine, full=True)
        except BaseException as exc:
            reason = describe(exc) if isinstance(exc, RecarchiveError) else type(exc).__name__
            with contextlib.suppress(Exception):
                store.finish_run(run_id, status=RunStatus.FAILED, counts={}, error=reason)
            raise
        status = (
            RunStatus.PARTIAL if report.skipped or report.without_sidecar else RunStatus.SUCCEEDED
        )
        store.finish_run(run_id, status=status, counts={"archived": report.recordings})
        return report
    finally:
        engine.dispose()


def _check_empty(store: ArchiveStore, settings: Settings) -> bool:
    """Refuse a database with rows, unless all it holds is an unfinished rebuild's.

    Returns:
        Whether an unfinished rebuild is being continued.
    """
    kinds = store.run_kinds()
    continuing = bool(kinds) and all(
        kind == REBUILD and status != RunStatus.SUCCEEDED for kind, status in kinds
    )
    if continuing:
        logger.warning("continuing the rebuild that stopped in this database")
        return True
    ledger, recordings = sum(store.counts().values()), store.recording_count()
    if ledger or recordings or kinds:
        raise ConfigError(
            f"rebuild needs an empty database: {safe_database_url(settings.database_url)} "
            f"has {ledger} ledger rows, {recordings} recordings and runs of "
            f"{', '.join(sorted({kind for kind, _ in kinds})) or 'no kind'} "
            "(point RECARCHIVE_DATABASE_URL at a new one)"
        )
    return False


def _check_no_dataset(settings: Settings) -> None:
    """Refuse to replace a Parquet dataset that survived: it may hold what S3 cannot give back."""
    files = partition_files(settings.parquet_root, s3_endpoint_url=settings.s3_endpoint_url)
    if files:
        raise ConfigError(
            f"the Parquet root {settings.parquet_root} holds {files} partition files: they may "
            "hold recordings the archive cannot give back (metadata only, failed). Point "
            "RECARCHIVE_PARQUET_ROOT at a new root, or pass --overwrite-parquet"
        )


def _restore(
    settings: Settings,
    store: ArchiveStore,
    media: MediaStore,
    workspace: str,
    verify: bool,
    report: RebuildReport,
    on_progress: Callable[[int], None] | None,
) -> None:
    fetched_at = datetime.now(UTC)
    seen = 0
    listed = workspace_prefix(settings.s3_prefix, workspace)
    with ThreadPoolExecutor(max_workers=settings.concurrency) as pool:
        for batch in _batches(iter_recordings(media, listed), BATCH):
            found = list(
                pool.map(
                    lambda item: _read(media, item, workspace, fetched_at, verify, report), batch
                )
            )
            kept = [item for item in found if item is not None]
            store.save_metadata([item.record for item in kept if item.record is not None])
            store.restore_entries(
                [item.entry for item in kept],
                extra={item.entry.recording_id: item.lock for item in kept if item.lock},
            )
            store.record_transcriptions([t for item in kept for t in item.transcriptions])
            for item in kept:
                if item.record is None:
                    continue
                report.recordings += 1
                report.bytes += item.entry.size_bytes or 0
                created = item.record.created_at
                report.first_created = min(report.first_created or created, created)
                report.last_created = max(report.last_created or created, created)
            seen += len(batch)
            if on_progress is not None:
                on_progress(seen)


def _read(
    media: MediaStore,
    item: StoredRecording,
    workspace: str,
    fetched_at: datetime,
    verify: bool,
    report: RebuildReport,
) -> _Found | None:
    """The rows of one stored recording; ``None`` (and why, in ``report``) when it has none.

    ``report``'s lists are appended to from the pool's threads: ``list.append`` is atomic.
    """
    recording_id = item.recording_id
    if item.tombstone is not None:
        return _tombstone(media, item, report)
    if item.media is None:
        if item.sidecar is not None:
            report.skipped.append((recording_id, "a sidecar without its MP3"))
        return None
    if item.sidecar is None:
        # Pending at its pinned key: the next run given the ID (or retry-failed, which takes
        # pending rows no run holds) finds the object there and adopts it once its bytes
        # match its own sha256 metadata, without downloading it again.
        report.without_sidecar.append(recording_id)
        return _Found(None, _entry(recording_id, LedgerState.PENDING, media.bucket, item.media))
    try:
        facts = media_facts(media, item.media)
        if facts is None:
            report.skipped.append((recording_id, "its MP3 disappeared during the rebuild"))
            return None
        if not facts.sha256:
            report.skipped.append((recording_id, "its MP3 has no sha256 metadata"))
            return None
        hashed = verify and facts.unreadable is None
        if verify and facts.unreadable is not None:
            # An archive class: its bytes cannot be read until restored (`verify --restore`).
            report.unhashed.append((recording_id, facts.unreadable))
        if facts.size != item.media_size or (
            hashed and media.hash_object(item.media) != (facts.size, facts.sha256)
        ):
            # Registered pending at its key: the run that takes it hashes the object again and
            # adopts it only if it matches, else leaves it for an operator (recovery's rule).
            report.skipped.append(
                (recording_id, "its MP3's bytes do not match its sha256 metadata: left pending")
            )
            return _Found(None, _entry(recording_id, LedgerState.PENDING, media.bucket, item.media))
        record = normalize_recording(
            read_json(media, item.sidecar), workspace_id=workspace, fetched_at=fetched_at
        )
    except StorageUnavailableError:
        raise  # S3 refuses us altogether (credentials, no bucket): no point in going on
    except Exception as exc:  # one recording's objects, whatever raised: the others go on
        report.skipped.append((recording_id, describe(exc)))
        return None
    if record.id != recording_id:
        report.skipped.append((recording_id, f"its sidecar describes {record.id}"))
        return None
    entry = replace(
        _entry(recording_id, LedgerState.ARCHIVED, media.bucket, item.media),
        size_bytes=facts.size,
        sha256=facts.sha256,
        archived_at=facts.archived_at,
    )
    lock: dict[str, object] = {
        "lock_mode": facts.lock_mode,
        "retain_until": facts.retain_until,
        "legal_hold": facts.legal_hold,
    }
    rows = _transcriptions(media, item, report)
    if wants_transcripts(record):
        # What was not ready yet left no object: a listing row due now makes the next
        # retry-failed ask Bird again (one listing; the stored ones cost no content request).
        rows.append(
            TranscriptionOutcome(
                recording_id,
                LISTING,
                TranscriptionState.PENDING,
                error="rebuilt from the archive: look at Bird's list again",
                retry_at=datetime.now(UTC),
            )
        )
    return _Found(record, entry, lock, rows)


def _transcriptions(
    media: MediaStore, item: StoredRecording, report: RebuildReport
) -> list[TranscriptionOutcome]:
    """The ``archived`` transcription rows of one recording, from its objects' metadata.

    A transcription counts when its ``.json`` carries ``sha256`` metadata (the run writes it
    first); one that cannot be read is skipped, and the next ``--refresh`` adopts it.
    """
    found: dict[str, dict[str, StoredFormat]] = {}
    facts: dict[str, tuple[datetime | None, str | None]] = {}
    for key in item.others:
        match = _TRANSCRIPTION.search(key)
        if match is None:
            continue
        try:
            response = media.s3.head_object(Bucket=media.bucket, Key=key)
        except Exception as exc:  # this object only: the recording is restored regardless
            report.skipped.append((item.recording_id, f"{key}: {type(exc).__name__}"))
            continue
        info = object_info(response)
        if not info.sha256:
            report.skipped.append((item.recording_id, f"{key} has no sha256 metadata"))
            continue
        found.setdefault(match["id"], {})[match["fmt"]] = StoredFormat(key, info.size, info.sha256)
        if match["fmt"] == "json":
            facts[match["id"]] = (info.archived_at, (response.get("Metadata") or {}).get(LOCALE))
    return [
        TranscriptionOutcome(
            item.recording_id,
            transcription_id,
            TranscriptionState.ARCHIVED,
            bird_status="available",
            locale=facts[transcription_id][1],
            bucket=media.bucket,
            formats=formats,
            archived_at=facts[transcription_id][0],
        )
        for transcription_id, formats in sorted(found.items())
        if "json" in formats
    ]


def _tombstone(media: MediaStore, item: StoredRecording, report: RebuildReport) -> _Found:
    """The ``erased`` ledger row of an erased recording, from its ``.erased.json`` marker.

    The tombstone is what keeps every later run from fetching the recording again, so it is
    restored even when its marker cannot be read (the reason is then unknown).
    """
    reason = "unknown (its tombstone could not be read)"
    try:
        reason = str(read_json(media, item.tombstone or "").get("reason") or reason)
    except Exception as exc:  # the row is restored whatever the marker says
        report.skipped.append((item.recording_id, f"tombstone unreadable: {describe(exc)}"))
    left = [key for key in (item.media, item.sidecar, *item.others) if key]
    if left:
        # An erasure stopped between its tombstone and its deletes: the audit table that would
        # let `erase` resume it is gone with the database.
        report.skipped.append(
            (item.recording_id, f"erased, but {len(left)} objects remain: delete them by hand")
        )
    report.erased += 1
    entry = replace(
        _entry(
            item.recording_id,
            LedgerState.ERASED,
            media.bucket,
            f"{item.folder}{item.recording_id}.mp3",
        ),
        last_error=tombstone_reason(reason),
    )
    return _Found(None, entry)


def _entry(recording_id: str, state: LedgerState, bucket: str, key: str) -> LedgerEntry:
    return LedgerEntry(
        recording_id=recording_id,
        state=state,
        attempts=0,
        last_error=None,
        next_attempt_at=None,
        s3_bucket=bucket,
        s3_key=key,
        size_bytes=None,
        sha256=None,
        archived_at=None,
        lease_owner=None,
        lease_expires_at=None,
    )


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch
