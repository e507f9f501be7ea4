"""One recording's media: download through the API's redirect, verify, upload, sidecar.

The body is streamed into a temp file while its SHA-256 is computed, so memory is bounded by
the download's chunk size, never by the recording's size. Before anything is uploaded the
file must have the announced length and look like MPEG audio (an ID3 tag or an MPEG frame
sync), so an HTML error page or a truncated body is never stored.

Retry layers: the Bird client retries each HTTP request (the redirect and the media GET);
this module retries only what the client cannot see — a body that broke off or failed
verification — by downloading the whole recording again, at most ``attempts`` times. S3
requests are retried by botocore (see :mod:`recarchive.media.s3`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, Protocol, TypeVar

from recarchive.errors import MediaConflictError, MediaIntegrityError, RetryableError
from recarchive.media.keys import sidecar_key
from recarchive.tempfiles import MEDIA_SUFFIX, temp_prefix

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from contextlib import AbstractAsyncContextManager

    from recarchive.media.s3 import MediaStore

logger = logging.getLogger(__name__)
T = TypeVar("T")

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
    """

    bucket: str
    key: str
    size_bytes: int
    sha256: str
    outcome: Literal["uploaded", "already_present"]


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


def _write_and_hash(handle: BinaryIO, digest: Any, chunk: bytes) -> None:
    # Both release the GIL for large buffers, so this runs beside the event loop.
    digest.update(chunk)
    handle.write(chunk)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # noqa: PTH108


class _Worker:
    """One thread of this recording's own, for its file I/O, hashing and S3 calls.

    ``asyncio.to_thread`` shares the loop's default executor (``min(32, cpus + 4)`` threads,
    six on two cores) with every other blocking call of the run: chunks waiting there behind
    S3 requests stalled the downloads (bench/media_throughput.py). One thread per recording
    in flight is bounded by the pipeline's concurrency and keeps the chunk writes in order.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recarchive-media")

    async def run(self, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(func, *args, **kwargs))

    def submit(self, func: Callable[..., object], /, *args: Any) -> None:
        """Queue ``func`` behind the work already queued, without waiting for it."""
        self._executor.submit(func, *args)

    def close(self) -> None:
        # Queued work (a shielded unlink) still runs; nobody waits for the thread to end.
        self._executor.shutdown(wait=False)


async def _download(
    bird: MediaSource, recording_id: str, path: Path, progress: _Progress, worker: _Worker
) -> _Downloaded:
    """Stream the media into ``path`` (truncating it) and verify length and format."""
    digest = hashlib.sha256()
    head = bytearray()
    size = 0
    async with bird.open_media(recording_id) as download:
        progress.opened = True
        # Hashing and writing a chunk (about 1 MiB) take milliseconds of CPU and disk: done in
        # the worker thread, the event loop keeps receiving the other downloads meanwhile
        # (measured in bench/media_throughput.py: plain writes on the loop were the slower).
        handle = await worker.run(path.open, "wb")
        try:
            async for chunk in download.iter_bytes():
                size += len(chunk)
                if len(head) < SNIFF_BYTES:
                    head += chunk[: SNIFF_BYTES - len(head)]
                await worker.run(_write_and_hash, handle, digest, chunk)
        finally:
            # Queued behind a write that may still run in the thread (when this task was
            # cancelled mid-write); everything later on this worker runs after the close.
            worker.submit(handle.close)
        expected = download.content_length
        confirmed_by = download.confirmed_by
    if expected is not None and size != expected:
        raise MediaIntegrityError(
            f"media of {recording_id}: got {size} bytes, Content-Length said {expected}"
        )
    check_mpeg_audio(bytes(head), recording_id)
    return _Downloaded(size=size, sha256=digest.hexdigest(), confirmed_by=confirmed_by)


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
    worker = _Worker()
    try:
        if check_existing:
            stored = await _stored_copy(media, key, sidecar, worker)
            if stored is not None:
                return stored
        return await _transfer(
            bird, media, recording_id, key, sidecar, temp_dir, attempts, retry_delay, worker
        )
    finally:
        worker.close()


async def _stored_copy(
    media: MediaStore, key: str, sidecar: bytes, worker: _Worker
) -> MediaResult | None:
    """Return the object a crashed or failed earlier run already stored, if any.

    Objects are only ever written with their ``sha256`` metadata after the bytes were hashed,
    but the earlier attempt may have failed its read-back check (an S3-compatible store that
    ignores the upload checksum can keep a damaged body), so the object's bytes are hashed
    once more before they count: this path is rare (recovery only) and must never turn a
    damaged object into an ``archived`` one. The sidecar is written again because the crash
    may have come between the two writes.

    Raises:
        MediaConflictError: The object's bytes do not match its own metadata; it is left
            untouched for an operator, and the recording ends ``failed``.
    """
    info = await worker.run(media.head, key)
    if info is None or not info.sha256:
        return None
    size, digest = await worker.run(media.hash_object, key)
    if digest != info.sha256 or size != info.size:
        raise MediaConflictError(
            f"{key} exists but its bytes (sha256 {digest}, {size} bytes) do not match its "
            f"sha256 metadata {info.sha256} ({info.size} bytes); left untouched"
        )
    logger.info("media of %s is in S3 already (an earlier run stored it)", key)
    await worker.run(media.put_bytes, sidecar_key(key), sidecar)
    return MediaResult(
        bucket=media.bucket,
        key=key,
        size_bytes=info.size,
        sha256=info.sha256,
        outcome="already_present",
    )


async def _transfer(
    bird: MediaSource,
    media: MediaStore,
    recording_id: str,
    key: str,
    sidecar: bytes,
    temp_dir: Path | None,
    attempts: int,
    retry_delay: float,
    worker: _Worker,
) -> MediaResult:
    handle, name = tempfile.mkstemp(prefix=temp_prefix(), suffix=MEDIA_SUFFIX, dir=temp_dir)
    os.close(handle)
    path = Path(name)
    try:
        downloaded = await _download_with_retries(
            bird, recording_id, path, attempts, retry_delay, worker
        )
        outcome = await worker.run(
            media.store_file,
            key,
            path,
            size=downloaded.size,
            sha256_hex=downloaded.sha256,
            confirmed_by=downloaded.confirmed_by,
        )
        if outcome == "uploaded":
            await _verify_and_write_sidecar(media, key, sidecar, downloaded, worker)
        else:
            await worker.run(media.put_bytes, sidecar_key(key), sidecar)
    finally:
        # Unlinking a freshly written file costs milliseconds (the file system frees its
        # pages): a thread keeps that off the loop. Shielded, and repeated synchronously when
        # the task is cancelled meanwhile, so the file never outlives this call.
        try:
            await asyncio.shield(worker.run(_remove, path))
        except asyncio.CancelledError:
            _remove(path)
            raise
    return MediaResult(
        bucket=media.bucket,
        key=key,
        size_bytes=downloaded.size,
        sha256=downloaded.sha256,
        outcome=outcome,
    )


async def _verify_and_write_sidecar(
    media: MediaStore, key: str, sidecar: bytes, downloaded: _Downloaded, worker: _Worker
) -> None:
    """The read-back HEAD and the sidecar PUT at once: two round trips in the time of one.

    The media object exists when this starts, so a sidecar never stands beside nothing; if
    the read-back fails the recording is not archived, and the attempt that archives it
    writes the sidecar again.
    """
    side = _Worker()
    try:
        results = await asyncio.gather(
            worker.run(
                media.verify_stored, key, size=downloaded.size, sha256_hex=downloaded.sha256
            ),
            side.run(media.put_bytes, sidecar_key(key), sidecar),
            return_exceptions=True,
        )
    finally:
        side.close()
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def _download_with_retries(
    bird: MediaSource,
    recording_id: str,
    path: Path,
    attempts: int,
    retry_delay: float,
    worker: _Worker,
) -> _Downloaded:
    attempt = 0
    while True:
        attempt += 1
        progress = _Progress()
        try:
            return await _download(bird, recording_id, path, progress, worker)
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
