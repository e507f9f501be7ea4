"""Archived ledger rows against the objects in S3: exists, size, SHA-256.

Shallow verification trusts the object's ``sha256`` metadata (one HEAD per recording); deep
verification also downloads the object and hashes its bytes, which is what must have passed
before a recording's source may be deleted at Bird.

An object in a storage class that must be restored before a read (GLACIER, DEEP_ARCHIVE: the
HEAD's ``StorageClass``, or S3's ``InvalidObjectState`` on the GET) cannot be hashed: deep
verification reports it "needs restore" (or "restore in progress", from the HEAD's
``Restore`` header), which is not a problem; with ``restore`` it asks S3 for a restore
(:func:`~recarchive.media.locks.request_restore`) and reports "restore requested".
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from botocore.exceptions import ClientError

from recarchive.errors import MediaIntegrityError, RetryableError, StorageUnavailableError
from recarchive.media.locks import request_restore, restore_state
from recarchive.media.s3 import MediaStore
from recarchive.media.s3client import error_code
from recarchive.model import LedgerEntry, LedgerState

logger = logging.getLogger(__name__)


@dataclass
class VerifyProblem:
    """One mismatch between the ledger and S3.

    Attributes:
        recording_id: The recording.
        key: Its S3 key (``s3://bucket/key`` form is built by the reader when needed).
        problem: What is wrong, e.g. ``"missing object"`` or ``"size 123 != ledger 456"``.
    """

    recording_id: str
    key: str
    problem: str


@dataclass
class VerifyReport:
    """The outcome of a verification.

    Attributes:
        checked: Archived ledger rows looked at.
        ok: Rows without any problem.
        problems: Every problem found (a row may have several).
        verified: What deep verification learnt of each object that passed it.
        restores: Objects deep verification could not read before a restore, with what was
            done: ``needs restore``, ``restore in progress`` or ``restore requested``. Their
            HEAD (size, ``sha256`` metadata) passed; they count neither ok nor a problem.
    """

    checked: int
    ok: int
    problems: list[VerifyProblem] = field(default_factory=list)
    verified: dict[str, VerifiedObject] = field(default_factory=dict)
    restores: list[VerifyProblem] = field(default_factory=list)


@dataclass(frozen=True)
class VerifiedObject:
    """What a deep verification learnt about an object that passed it.

    Attributes:
        md5: Hex MD5 of its bytes (to compare with a plain-MD5 ETag at the source); empty
            unless it was asked for.
        confirmed_by: What confirmed the end of the download that stored it (object
            metadata ``confirmed-by``); ``None`` for objects stored before it was recorded.
    """

    md5: str
    confirmed_by: str | None


def _short(digest: str | None) -> str:
    if not digest:
        return "none"
    return f"{digest[:12]}…" if len(digest) > 12 else digest


class _Verifier:
    def __init__(
        self, media: MediaStore, *, deep: bool, want_md5: bool = False, restore: bool = False
    ) -> None:
        self.media = media
        self.deep = deep
        self.want_md5 = want_md5
        self.restore = restore
        self._stores: dict[str, MediaStore] = {media.bucket: media}

    def store_for(self, bucket: str) -> MediaStore:
        # Rows archived before the bucket setting changed still name their own bucket.
        store = self._stores.get(bucket)
        if store is None:
            store = self.media.for_bucket(bucket)
            self._stores[bucket] = store
        return store

    def check(self, entry: LedgerEntry) -> tuple[list[str], VerifiedObject | str | None]:
        """Return the problems of one archived row (empty when it is fine).

        With ``deep``, also what was learnt of the object when it passed, or (a string) why
        it could not be read: it needs a restore.
        """
        key, bucket = entry.s3_key, entry.s3_bucket
        if not key or not bucket or entry.size_bytes is None or not entry.sha256:
            return ["ledger row lacks bucket, key, size or sha256"], None
        store = self.store_for(bucket)
        try:
            info = store.head(key)
        except RetryableError as exc:
            return [f"could not check: {type(exc).__name__}: {exc}"], None
        if info is None:
            return ["missing object"], None
        problems: list[str] = []
        if info.size != entry.size_bytes:
            problems.append(f"size {info.size} != ledger {entry.size_bytes}")
        if info.sha256 != entry.sha256:
            problems.append(
                f"sha256 metadata {_short(info.sha256)} != ledger {_short(entry.sha256)}"
            )
        if not self.deep:
            return problems, None
        waiting = restore_state(info.storage_class, info.restore)
        if waiting is not None:
            return problems, None if problems else self._restore(store, key, waiting)
        try:
            size, digest, md5 = store.digest_object(key, md5=self.want_md5)
        except StorageUnavailableError as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and error_code(cause) == "InvalidObjectState":
                # An archive tier the HEAD does not name (INTELLIGENT_TIERING's archive tiers,
                # restored without Days): reported only; --restore asks for GLACIER ones.
                return problems, None if problems else "needs restore"
            raise
        except MediaIntegrityError as exc:
            return [*problems, f"could not read object: {exc}"], None
        except RetryableError as exc:
            return [*problems, f"could not download: {type(exc).__name__}: {exc}"], None
        if size != entry.size_bytes and info.size == entry.size_bytes:
            problems.append(f"downloaded size {size} != ledger {entry.size_bytes}")
        if digest != entry.sha256:
            problems.append(f"content hash {_short(digest)} != ledger {_short(entry.sha256)}")
        if problems:
            return problems, None
        return problems, VerifiedObject(md5=md5, confirmed_by=info.confirmed_by)

    def _restore(self, store: MediaStore, key: str, waiting: str) -> str:
        """Ask for a restore of ``key`` when ``restore`` is on and none runs; say what holds."""
        if not self.restore or waiting != "needs restore":
            return waiting
        return "restore requested" if request_restore(store.s3, store.bucket, key) else waiting


def verify_archive(
    entries: Sequence[LedgerEntry],
    media: MediaStore,
    *,
    deep: bool,
    concurrency: int,
    want_md5: bool = False,
    restore: bool = False,
) -> VerifyReport:
    """Check archived ledger rows against S3.

    Rows whose state is not ``archived`` are ignored. For each archived row: the object
    exists, its size matches the ledger, its ``sha256`` metadata matches the ledger; with
    ``deep``, its downloaded bytes hash to the ledger's SHA-256 as well.

    Args:
        entries: Ledger rows (attribute access only: ``recording_id``, ``state``,
            ``s3_bucket``, ``s3_key``, ``size_bytes``, ``sha256``).
        media: The media store; rows of another bucket are checked with the same client.
        deep: Download and hash every object.
        concurrency: Objects checked at once (threads).
        want_md5: Also compute each object's MD5 (deep only; for source deletion: it costs
            three times SHA-256's CPU).
        restore: Deep only: ask S3 to restore objects that need it (see the module).

    Returns:
        The report; problems are in the order of ``entries``.

    Raises:
        FatalError: S3 refused access or the bucket is missing (every check would fail).
    """
    archived = [entry for entry in entries if entry.state == LedgerState.ARCHIVED]
    verifier = _Verifier(media, deep=deep, want_md5=want_md5, restore=restore)
    report = VerifyReport(checked=len(archived), ok=0, problems=[])
    if not archived:
        return report
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        results = list(pool.map(verifier.check, archived))
    for entry, (problems, found) in zip(archived, results, strict=True):
        if isinstance(found, str):
            logger.info("verify %s (s3://%s/%s): %s", *_where(entry), found)
            report.restores.append(VerifyProblem(entry.recording_id, entry.s3_key or "", found))
            continue
        if not problems:
            report.ok += 1
            if found is not None:
                report.verified[entry.recording_id] = found
            continue
        for problem in problems:
            logger.warning("verify %s (s3://%s/%s): %s", *_where(entry), problem)
            report.problems.append(
                VerifyProblem(
                    recording_id=entry.recording_id, key=entry.s3_key or "", problem=problem
                )
            )
    return report


def _where(entry: LedgerEntry) -> tuple[str, str | None, str | None]:
    return entry.recording_id, entry.s3_bucket, entry.s3_key


class StoredFormatRow(Protocol):
    """One stored format of a transcription, as its ledger row names it."""

    @property
    def key(self) -> str:
        """Its S3 key."""
        ...

    @property
    def size(self) -> int:
        """Its size in bytes."""
        ...

    @property
    def sha256(self) -> str:
        """Its hex SHA-256."""
        ...


class ArchivedTranscription(Protocol):
    """What :func:`verify_transcriptions` reads of an ``archived`` transcription ledger row."""

    @property
    def recording_id(self) -> str:
        """The recording."""
        ...

    @property
    def transcription_id(self) -> str:
        """The transcription."""
        ...

    @property
    def s3_bucket(self) -> str | None:
        """The bucket of its objects."""
        ...

    @property
    def formats(self) -> Mapping[str, StoredFormatRow]:
        """Its stored formats by name."""
        ...


def verify_transcriptions(
    rows: Sequence[ArchivedTranscription], media: MediaStore, *, deep: bool, concurrency: int
) -> list[VerifyProblem]:
    """Check archived transcriptions' objects: exist, size and ``sha256`` metadata (and bytes).

    Returns:
        The problems, named ``transcription {id}.{fmt}: ...``, in the order of ``rows``.

    Raises:
        FatalError: S3 refused access or the bucket is missing.
    """
    checks = [(row, fmt, stored) for row in rows for fmt, stored in sorted(row.formats.items())]

    def check(item: tuple[ArchivedTranscription, str, StoredFormatRow]) -> str | None:
        row, _fmt, stored = item
        store = media.for_bucket(row.s3_bucket or media.bucket)
        try:
            info = store.head(stored.key)
            if info is None:
                return "missing object"
            if info.size != stored.size or info.sha256 != stored.sha256:
                return f"size {info.size} / sha256 metadata {_short(info.sha256)} != ledger"
            if deep:
                size, digest = store.hash_object(stored.key)
                if (size, digest) != (stored.size, stored.sha256):
                    return f"content hash {_short(digest)} != ledger {_short(stored.sha256)}"
        except StorageUnavailableError:
            raise
        except (RetryableError, MediaIntegrityError) as exc:
            return f"could not check: {exc}"
        return None

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        found = list(pool.map(check, checks))
    problems: list[VerifyProblem] = []
    for (row, fmt, stored), problem in zip(checks, found, strict=True):
        if problem is not None:
            text = f"transcription {row.transcription_id}.{fmt}: {problem}"
            logger.warning("verify %s (%s): %s", row.recording_id, stored.key, text)
            problems.append(VerifyProblem(row.recording_id, stored.key, text))
    return problems
