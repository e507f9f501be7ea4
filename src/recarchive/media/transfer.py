"""One recording's media: download through the API's redirect, verify, upload, sidecar.

The body is streamed into a temp file while its SHA-256 is computed, so memory is bounded by
the download's chunk size, never by the recording's size; a small one waits in memory under
a process-wide budget instead (:mod:`recarchive.media.spool`). Before anything is uploaded
the body must have the announced length and look like MPEG audio (an ID3 tag or an MPEG
frame sync), so an HTML error page or a truncated body is never stored.

Per recording that stored a new object: the redirect GET, the media GET, one create-only
PUT, then the read-back HEAD beside the sidecar PUT; nothing else (no temp file or thread
of its own for a small body).

Retry layers: the Bird client retries each HTTP request (the redirect and the media GET);
this module retries only what the client cannot see — a body that broke off or failed
verification — by downloading the whole recording again, at most ``attempts`` times. S3
requests are retried by botocore (see :mod:`recarchive.media.s3`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from recarchive.errors import MediaConflictError, MediaIntegrityError, RetryableError
from recarchive.media import spool as body_spool
from recarchive.media.keys import sidecar_key
from recarchive.media.locks import NO_RETENTION, Retention, restore_state
from recarchive.media.spool import BodySpool, in_thread

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from contextlib import AbstractAsyncContextManager

    from recarchive.media.s3 import MediaStore

logger = logging.getLogger(__name__)

#: Bytes kept from the start of the body to recognise MPEG audio.
SNIFF_BYTES = 64 * 1024
#: First delay between whole-download attempts (doubles each time, capped below).
RETRY_BASE_DELAY = 0.25
RETRY_MAX_DELAY = 5.0
#: Zero bytes tolerated between an ID3 tag and the first frame (encoders pad tags).
MAX_ID3_PADDING = 4096


class MediaStream(Protocol):
    """What ``BirdClient.open_media`` yields (:class:`recarchive.bird.answer.MediaDownload`)."""

    recording_id: str
    content_length: int | None
    #: Set once the body was read whole: what confirmed its end (``"content-length"``, ...).
    confirmed_by: str | None

    def iter_bytes(self) -> AsyncIterator[bytes]:
        """Yield the body; raises RetryableError subclasses when it breaks off."""
        ...


class MediaSource(Protocol):
    """The part of :class:`recarchive.bird.client.BirdClient` that downloads media."""

    def open_media(self, recording_id: str) -> AbstractAsyncContextManager[MediaStream]:
        """Open a recording's MP3 through the API redirect."""
        ...


@dataclass(frozen=True)
class MediaResult:
    """Where a recording's media is stored, and what it is.

    Attributes:
        bucket: The S3 bucket.
        key: The object key.
        size_bytes: Size of the MP3.
        sha256: Hex SHA-256 of its bytes.
        outcome: ``uploaded`` by this call, or ``already_present`` (same bytes were there).
        retention: The retention the MP3 and sidecar were written with (the ledger keeps it).
        archived_at: When it was archived, as its ``archived-at`` metadata says (the ledger
            keeps the same instant, so ``rebuild`` gives it back); ``None``: unknown, an older
            object found in place.
    """

    bucket: str
    key: str
    size_bytes: int
    sha256: str
    outcome: Literal["uploaded", "already_present"]
    retention: Retention = NO_RETENTION
    archived_at: datetime | None = None


@dataclass(frozen=True)
class _Downloaded:
    size: int
    sha256: str
    confirmed_by: str | None


def check_mpeg_audio(head: bytes, recording_id: str) -> None:
    """Raise unless ``head`` (the first bytes of a body) starts like an MP3 file.

    Accepted: an ID3v2 tag (``ID3``, version, flags, synchsafe size) followed — when the
    tag ends within ``head`` — by an MPEG frame sync (11 set bits, ``0xFF 0xE*``) after at
    most :data:`MAX_ID3_PADDING` zero bytes; or a frame sync at the very start. Everything
    else (HTML or XML error pages, JSON, empty bodies) is rejected.

    Raises:
        MediaIntegrityError: The bytes are not MPEG audio.
    """
    offset = 0
    if head[:3] == b"ID3":
        if len(head) < 10 or head[3] == 0xFF or any(byte & 0x80 for byte in head[6:10]):
            raise MediaIntegrityError(f"media of {recording_id}: malformed ID3 tag")
        size = int.from_bytes(bytes(b & 0x7F for b in head[6:10]), "big")
        footer = 10 if head[5] & 0x10 else 0
        offset = 10 + size + footer
        if offset >= len(head):
            return  # a large tag (cover art): the frames start beyond what was sniffed
        padding = len(head[offset : offset + MAX_ID3_PADDING]) - len(
            head[offset : offset + MAX_ID3_PADDING].lstrip(b"\x00")
        )
        offset += padding
        if offset >= len(head):
            return
    if len(head) >= offset + 2 and head[offset] == 0xFF and head[offset + 1] & 0xE0 == 0xE0:
        return
    start = head[:16].decode("ascii", "replace").strip()
    raise MediaIntegrityError(
        f"media of {recording_id}: not MPEG audio (starts with {start[:16]!r})"
        if head
        else f"media of {recording_id}: empty body"
    )


class _Progress:
    """Whether the current attempt got past ``open_media`` (a body to retry)."""

    opened = False


async def _download(
    bird: MediaSource, recording_id: str, spool: BodySpool, progress: _Progress
) -> _Downloaded:
    """Stream the media into ``spool`` (dropping earlier bytes) and verify length and format."""
    head = bytearray()
    size = 0
    async with bird.open_media(recording_id) as download:
        progress.opened = True
        await spool.start(download.content_length)
        async for chunk in download.iter_bytes():
            size += len(chunk)
            if len(head) < SNIFF_BYTES:
                head += chunk[: SNIFF_BYTES - len(head)]
            await spool.write(chunk)
        expected = download.content_length
        confirmed_by = download.confirmed_by
    await spool.finish()
    if expected is not None and size != expected:
        raise MediaIntegrityError(
            f"media of {recording_id}: got {size} bytes, Content-Length said {expected}"
        )
    check_mpeg_audio(bytes(head), recording_id)
    return _Downloaded(size=size, sha256=spool.sha256(), confirmed_by=confirmed_by)


async def archive_media(
    bird: MediaSource,
    media: MediaStore,
    *,
    recording_id: str,
    key: str,
    sidecar: bytes,
    temp_dir: Path | None = None,
    attempts: int = 3,
    retry_delay: float = RETRY_BASE_DELAY,
    check_existing: bool = False,
    memory_limit: int | None = None,
    created_at: datetime | None = None,
) -> MediaResult:
    """Download a recording's MP3, verify it, store it at ``key`` with its sidecar.

    Args:
        bird: The Bird client (``open_media``).
        media: The S3 media store.
        recording_id: The recording.
        key: Destination key of the MP3 (see :func:`recarchive.media.keys.media_key`).
        sidecar: The redacted metadata JSON, stored beside the MP3.
        temp_dir: Folder of the temp file (system default when ``None``).
        attempts: Whole downloads tried when a body breaks off or fails verification.
        retry_delay: First delay between those downloads (doubles, capped at
            :data:`RETRY_MAX_DELAY`).
        check_existing: HEAD ``key`` first, and when an earlier (crashed) run stored the
            object already, only write the sidecar: no download. For recordings an earlier
            run may have been transferring; without it, an existing object costs a download
            and is then compared by hash (the upload is create-only).
        memory_limit: Largest body kept in memory instead of a temp file (``0``: always a
            temp file; ``None``: :data:`recarchive.media.spool.MEMORY_BODY_BYTES`).
        created_at: The recording's ``createdAt``: with a lock mode, the MP3 and the sidecar
            are retained until it + the retention days (required then).

    Returns:
        Where and what was stored.

    Raises:
        MediaIntegrityError: Every attempt gave a truncated or non-MP3 body.
        RetryableError: The download or S3 kept failing.
        MediaConflictError: ``key`` holds different bytes (nothing overwritten).
        NotFoundError, MediaNotAvailableError, AuthError: from the Bird client.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    if created_at is None and media.retention.mode is not None:
        raise ValueError("a lock mode needs the recording's createdAt")
    retention = media.retention.for_created(created_at) if created_at else NO_RETENTION
    if check_existing:
        stored = await _stored_copy(media, key, sidecar, retention)
        if stored is not None:
            return stored
    # A body in memory goes up in one PUT: never one of multipart size.
    if memory_limit is None:
        memory_limit = body_spool.MEMORY_BODY_BYTES  # read now: tests lower it
    spool = BodySpool(temp_dir, memory_limit=min(memory_limit, media.multipart_threshold - 1))
    try:
        downloaded = await _download_with_retries(bird, recording_id, spool, attempts, retry_delay)
        archived_at = datetime.now(UTC)
        found = {
            "sha256_hex": downloaded.sha256,
            "confirmed_by": downloaded.confirmed_by,
            "retention": retention,
            "archived_at": archived_at,
        }
        if spool.data is not None:
            outcome = await in_thread(media.store_bytes, key, spool.data, **found)
        else:
            assert spool.path is not None
            outcome = await in_thread(
                media.store_file, key, spool.path, size=downloaded.size, **found
            )
    finally:
        # Memory given back and the temp file removed before the read-back: neither is
        # needed any more, and the file never outlives this call (see BodySpool.close).
        await spool.close()
    if outcome == "uploaded":
        await _verify_and_write_sidecar(media, key, sidecar, downloaded, retention)
    else:
        await in_thread(media.put_bytes, sidecar_key(key), sidecar, retention=retention)
    return MediaResult(
        media.bucket,
        key,
        downloaded.size,
        downloaded.sha256,
        outcome,
        retention,
        archived_at if outcome == "uploaded" else None,
    )


async def _stored_copy(
    media: MediaStore, key: str, sidecar: bytes, retention: Retention
) -> MediaResult | None:
    """Return the object a crashed or failed earlier run already stored, if any.

    Objects are only ever written with their ``sha256`` metadata after the bytes were hashed,
    but the earlier attempt may have failed its read-back check (an S3-compatible store that
    ignores the upload checksum can keep a damaged body), so the object's bytes are hashed
    once more before they count: this path is rare (recovery only) and must never turn a
    damaged object into an ``archived`` one. The sidecar is written again because the crash
    may have come between the two writes. An object in an archive storage class (GLACIER,
    DEEP_ARCHIVE) cannot be read without a restore: its HEAD is trusted instead — S3, the
    only store with those classes, checked the upload's ``ChecksumSHA256`` itself.

    Raises:
        MediaConflictError: The object's bytes do not match its own metadata; it is left
            untouched for an operator, and the recording ends ``failed``.
    """
    info = await in_thread(media.head, key)
    if info is None or not info.sha256:
        return None
    if restore_state(info.storage_class, info.restore) is not None:
        size, digest = info.size, info.sha256
    else:
        size, digest = await in_thread(media.hash_object, key)
    if digest != info.sha256 or size != info.size:
        raise MediaConflictError(
            f"{key} exists but its bytes (sha256 {digest}, {size} bytes) do not match its "
            f"sha256 metadata {info.sha256} ({info.size} bytes); left untouched"
        )
    logger.info("media of %s is in S3 already (an earlier run stored it)", key)
    await in_thread(media.put_bytes, sidecar_key(key), sidecar, retention=retention)
    return MediaResult(
        bucket=media.bucket,
        key=key,
        size_bytes=info.size,
        sha256=info.sha256,
        outcome="already_present",
        retention=retention,
        archived_at=info.archived_at,
    )


async def _verify_and_write_sidecar(
    media: MediaStore, key: str, sidecar: bytes, downloaded: _Downloaded, retention: Retention
) -> None:
    """The read-back HEAD and the sidecar PUT at once: two round trips in the time of one.

    The media object exists when this starts, so a sidecar never stands beside nothing; if
    the read-back fails the recording is not archived, and the attempt that archives it
    writes the sidecar again.
    """
    found = {"size": downloaded.size, "sha256_hex": downloaded.sha256, "retention": retention}
    results = await asyncio.gather(
        in_thread(media.verify_stored, key, **found),
        in_thread(media.put_bytes, sidecar_key(key), sidecar, retention=retention),
        return_exceptions=True,
    )
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def _download_with_retries(
    bird: MediaSource, recording_id: str, spool: BodySpool, attempts: int, retry_delay: float
) -> _Downloaded:
    attempt = 0
    while True:
        attempt += 1
        progress = _Progress()
        try:
            return await _download(bird, recording_id, spool, progress)
        except RetryableError as exc:
            # Errors of open_media itself come after the client's own retries of that
            # request: retrying them here would stack a second retry layer on top.
            if attempt >= attempts or not progress.opened:
                raise
            delay = min(retry_delay * 2 ** (attempt - 1), RETRY_MAX_DELAY)
            if exc.retry_after is not None:
                delay = max(delay, min(exc.retry_after, RETRY_MAX_DELAY))
            logger.info(
                "media of %s: %s; downloading again in %.2fs (attempt %d of %d)",
                recording_id,
                exc,
                delay,
                attempt + 1,
                attempts,
            )
            await asyncio.sleep(delay)
