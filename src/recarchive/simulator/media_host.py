"""The simulator's media host: the S3-like server the API's ``.mp3`` redirects point at.

It accepts only the expiring signed URLs the API host hands out (an HMAC of workspace,
recording and expiry), answers S3's XML errors, serves range GETs, and applies the media
faults: a slow start, a reset, a 503 and a body cut off half way (truncate).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Callable

from aiohttp import web

from recarchive.simulator.host import HostState, drop
from recarchive.simulator.mp3 import Mp3Source

#: Set on a request the handler logged itself (streamed media).
LOGGED = web.RequestKey("logged", bool)


class MediaHost:
    """Signed media URLs and the handler that serves them.

    Args:
        state: Settings (workspace and seed), dataset, faults and attempt counter.
        log: Records a request with the status answered, for the request log.
        url: Base URL of the media host, known once its port is bound.
    """

    def __init__(
        self, state: HostState, log: Callable[[web.Request, int], None], url: Callable[[], str]
    ) -> None:
        self._state = state
        self._log = log
        self._url = url
        self._secret = hashlib.sha256(f"media-signing:{state.config.seed}".encode()).digest()

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Add the media route to ``router``."""
        router.add_get("/media/{workspace}/{recording}.mp3", self._media)

    def signed_url(self, recording_id: str, ttl_seconds: float) -> str:
        """The URL of ``recording_id``'s media, valid for ``ttl_seconds`` (negative: expired)."""
        expires = int(time.time() + ttl_seconds)
        signature = self._signature(recording_id, expires)
        return (
            f"{self._url()}/media/{self._state.config.workspace_id}/{recording_id}.mp3"
            f"?X-Amz-Expires={expires}&X-Amz-Signature={signature}"
        )

    def _signature(self, recording_id: str, expires: int) -> str:
        message = f"{self._state.config.workspace_id}/{recording_id}:{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    async def _media_range(
        self, request: web.Request, source: Mp3Source, byte_range: tuple[int, int]
    ) -> web.StreamResponse:
        """S3's answer to a range GET: 206 with ``Content-Range`` naming the total size."""
        start, end = byte_range
        self._log(request, 206)
        request[LOGGED] = True
        body = bytearray()
        for chunk in source.iter_chunks(limit=end + 1):
            body += chunk
        return web.Response(
            status=206,
            body=bytes(body[start : end + 1]),
            content_type="audio/mpeg",
            headers={"Content-Range": f"bytes {start}-{end}/{source.size}"},
        )

    async def _media(self, request: web.Request) -> web.StreamResponse:
        recording_id = request.match_info["recording"]
        try:
            expires = int(request.query.get("X-Amz-Expires", ""))
        except ValueError:
            return _s3_error(403, "AccessDenied", "Query-string authentication requires expiry")
        signature = request.query.get("X-Amz-Signature", "")
        if not hmac.compare_digest(signature, self._signature(recording_id, expires)):
            return _s3_error(403, "SignatureDoesNotMatch", "The signature does not match")
        if expires < time.time():
            return _s3_error(403, "AccessDenied", "Request has expired")
        if not self._state.dataset.has_media(recording_id):
            return _s3_error(404, "NoSuchKey", "The specified key does not exist.")
        key = f"media:{recording_id}"
        attempt = self._state.attempt(key)
        if self._state.faults.hits("slow", key, attempt):
            await asyncio.sleep(self._state.faults.slow_seconds)
        if self._state.faults.hits("reset", key, attempt):
            drop(request)
        if self._state.faults.hits("500", key, attempt):
            return _s3_error(503, "SlowDown", "Please reduce your request rate.")
        source = self._state.dataset.media(recording_id)
        byte_range = _byte_range(request.headers.get("Range"), source.size)
        if byte_range is not None:
            return await self._media_range(request, source, byte_range)
        truncate = self._state.faults.hits("truncate", key, attempt)
        # Logged before the body goes out: the client may have read it all before this handler
        # returns, and a test must then find the request in the log. A planned truncation is
        # logged as a dropped connection (status 0).
        self._log(request, 0 if truncate else 200)
        request[LOGGED] = True
        response = web.StreamResponse(status=200)
        response.content_length = source.size
        response.content_type = "audio/mpeg"
        await response.prepare(request)
        limit = source.size // 2 if truncate else None
        for chunk in source.iter_chunks(limit=limit):
            await response.write(chunk)
        if truncate:
            drop(request)
        await response.write_eof()
        self._state.stats.downloaded(recording_id)
        return response


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(first, last)`` of a single ``Range: bytes=first-last`` within ``size``, else ``None``."""
    if not header or not header.startswith("bytes="):
        return None
    first, sep, last = header.removeprefix("bytes=").partition("-")
    if not sep or not first.isdigit() or (last and not last.isdigit()):
        return None
    start, end = int(first), min(int(last) if last else size - 1, size - 1)
    return (start, end) if start <= end else None


def _s3_error(status: int, code: str, message: str) -> web.Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    )
    return web.Response(status=status, text=body, content_type="application/xml")
