"""Transcription objects beside a recording's MP3: written once, checksummed, read back.

The rules of the media objects (:mod:`recarchive.media.s3`): each write is create-only
(``IfNoneMatch="*"``), carries the SHA-256 as ``ChecksumSHA256`` and as ``sha256`` metadata,
is encrypted with the store's SSE settings, and is read back with a HEAD before it counts.
With a lock mode the object is retained like its MP3 (until ``createdAt`` + the days); it
stays in the default storage class, like the sidecar (``rebuild`` and ``verify`` read it).

A refused create (412) of a key that already holds the same bytes (its ``sha256`` metadata
and size equal) is adopted: that is what makes a killed run's redo write nothing twice.
Different bytes are a :class:`~recarchive.errors.MediaConflictError`: never overwritten.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from recarchive.media.locks import NO_RETENTION, Retention
from recarchive.media.objects import lock_args, object_metadata

if TYPE_CHECKING:
    from recarchive.media.s3 import MediaStore, UploadOutcome

#: Content type per archived format.
CONTENT_TYPES = {"json": "application/json", "txt": "text/plain; charset=utf-8"}
#: User metadata: the transcription's locale (``rebuild`` gives it back to the ledger).
LOCALE = "locale"


@dataclass(frozen=True)
class StoredObject:
    """One transcription object as stored.

    Attributes:
        key: Its key.
        size: Its size in bytes.
        sha256: Hex SHA-256 of its bytes.
        outcome: ``uploaded`` now, or ``already_present`` (the same bytes were there).
        archived_at: When it was stored: now, or for an adopted object its own
            ``archived-at`` (``None`` when it has none).
    """

    key: str
    size: int
    sha256: str
    outcome: UploadOutcome
    archived_at: datetime | None = None


def store_transcription(
    media: MediaStore,
    key: str,
    data: bytes,
    *,
    fmt: str,
    locale: str | None = None,
    retention: Retention = NO_RETENTION,
    archived_at: datetime | None = None,
    legal_hold: bool = False,
) -> StoredObject:
    """Write one transcription format at ``key`` unless it exists; verify it.

    Args:
        media: The store of the recording's bucket.
        key: See :func:`recarchive.media.keys.transcription_key`.
        data: The content, as Bird sent it.
        fmt: ``json`` or ``txt``.
        locale: Bird's locale, kept as metadata.
        retention: The recording's retention (its MP3's).
        archived_at: Kept as ``archived-at`` metadata.
        legal_hold: Write it under a legal hold (its recording's hold is on: ``hold --on``
            held the objects there were, this one comes later).

    Returns:
        What is stored.

    Raises:
        MediaConflictError: ``key`` holds other bytes; nothing was overwritten.
        MediaIntegrityError: The read-back does not show the size and hash sent.
        RetryableError: Transient S3 failure after botocore's retries.
        StorageUnavailableError: Access denied, no such bucket, bad credentials.
    """
    digest = hashlib.sha256(data).hexdigest()
    metadata = object_metadata(digest, None, archived_at)
    if locale:
        metadata[LOCALE] = locale

    locks = lock_args(retention)
    if legal_hold:
        # S3 (and moto) refuse lock headers without a checksum algorithm, as lock_args says.
        locks.update(ObjectLockLegalHoldStatus="ON", ChecksumAlgorithm="SHA256")

    def write() -> None:
        media.s3.put_object(
            Bucket=media.bucket,
            Key=key,
            Body=data,
            ContentType=CONTENT_TYPES[fmt],
            ChecksumSHA256=base64.b64encode(bytes.fromhex(digest)).decode(),
            IfNoneMatch="*",
            Metadata=metadata,
            **locks,
            # The store's SSE arguments, as for every object it writes.
            **media.sse_args(),
        )

    # The store's own create-only rule: a 412 is resolved by comparing the stored object's
    # sha256 metadata and size (adopted when equal, a conflict when not); other S3 errors
    # are translated there.
    outcome = media.store_once(key, len(data), digest, write)
    if outcome == "uploaded":
        media.verify_stored(key, size=len(data), sha256_hex=digest, retention=retention)
        return StoredObject(key, len(data), digest, outcome, archived_at)
    # Adopted (a killed or failed look stored it): the ledger keeps the object's own time, so
    # a rebuild from the object gives the same row back.
    info = media.head(key)
    return StoredObject(key, len(data), digest, outcome, info.archived_at if info else None)
