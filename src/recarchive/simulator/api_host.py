"""The simulator's API host: Bird's recordings endpoints.

``GET`` a recording's metadata, ``GET`` its ``.mp3`` (a 307 to a signed URL of the media
host), list recordings by page token and creation time, ``DELETE`` a recording's media. Every
request must carry the access key and passes the rate limit first; then the per-request faults
of the profile apply (slow, reset, 5xx, 429 with each form of ``Retry-After``).

Two endpoints are the simulator's own, for tests and benchmarks, and need no key (loopback
only, and neither holds a secret): ``GET /_sim/stats``, the request counts as JSON, and
``GET /_sim/ids``, every ID of the dataset (missing ones too), one per line.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

from aiohttp import web

from recarchive.simulator.host import HostState, drop
from recarchive.simulator.media_host import MediaHost


class _TokenBucket:
    """Requests per second with a small burst, answering how long until the next token."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate / 4)
        self.tokens = self.capacity
        self.updated = time.monotonic()

    def take(self) -> float:
        """Take a token; return 0, or the seconds to wait when none is left."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class ApiHost:
    """The recordings endpoints and the checks every API request passes first.

    Args:
        state: Settings (key, workspace, rate limit, URL lifetime), dataset, faults and attempt
            counter.
        media: The media host the ``.mp3`` requests are redirected to.
    """

    def __init__(self, state: HostState, media: MediaHost) -> None:
        self._state = state
        self._media = media
        rate = state.config.rate_limit
        self._bucket = _TokenBucket(rate) if rate else None

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Add the recordings routes to ``router``."""
        ws = "/workspaces/{workspace}/recordings"
        router.add_get(ws, self._list)
        router.add_get(ws + "/{recording}", self._get)
        router.add_delete(ws + "/{recording}", self._delete)
        router.add_get("/_sim/stats", self._stats)
        router.add_get("/_sim/ids", self._ids)

    async def checks(self, request: web.Request) -> web.StreamResponse | None:
        """Check the access key and the rate limit; a response means "answer this"."""
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme not in ("AccessKey", "Bearer") or not hmac.compare_digest(
            key.encode(), self._state.config.access_key.encode()
        ):
            return _error(401, "Unauthorized", "missing or invalid access key")
        if self._bucket is not None:
            wait = self._bucket.take()
            if wait > 0:
                response = _error(429, "TooManyRequests", "rate limit exceeded")
                response.headers["Retry-After"] = str(max(1, round(wait + 0.5)))
                return response
        return None

    async def request_faults(self, request: web.Request, key: str) -> web.StreamResponse | None:
        """Apply the per-request faults of the profile; a response means "answer this"."""
        attempt = self._state.attempt(key)
        faults = self._state.faults
        if faults.hits("slow", key, attempt):
            await asyncio.sleep(faults.slow_seconds)
        if faults.hits("reset", key, attempt):
            drop(request)
        if faults.hits("500", key, attempt):
            status = (500, 502, 503)[attempt % 3]
            return _error(status, "InternalError", "simulated server error")
        if faults.hits("429", key, attempt):
            response = _error(429, "TooManyRequests", "simulated rate limit")
            variant = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 4
            if variant == 0:
                response.headers["Retry-After"] = "1"
            elif variant == 1:
                response.headers["Retry-After"] = "0"
            elif variant == 2:
                when = datetime.now(UTC) + timedelta(seconds=1)
                response.headers["Retry-After"] = format_datetime(when, usegmt=True)
            return response
        return None

    def _workspace_ok(self, request: web.Request) -> bool:
        return request.match_info["workspace"] == self._state.config.workspace_id

    async def _get(self, request: web.Request) -> web.StreamResponse:
        if not self._workspace_ok(request):
            return _error(404, "NotFound", "workspace not found")
        raw = request.match_info["recording"]
        wants_media = raw.endswith(".mp3")
        recording_id = raw.removesuffix(".mp3")
        if not _is_uuid(recording_id):
            return _error(422, "InvalidParameter", "recordingId must be a UUID")
        kind = "link" if wants_media else "meta"
        fault = await self.request_faults(request, f"{kind}:{recording_id}")
        if fault is not None:
            return fault
        payload = self._state.dataset.payload(recording_id)
        if payload is None or self._state.faults.hits_recording("404", recording_id):
            return _error(404, "NotFound", "recording not found")
        if not wants_media:
            return _json(payload)
        if not self._state.dataset.has_media(recording_id):
            return _error(404, "NotFound", "recording media not available")
        expired = self._state.faults.hits(
            "expired", f"expired:{recording_id}", self._state.attempt(f"expired:{recording_id}")
        )
        ttl = -5.0 if expired else self._state.config.url_ttl_seconds
        response = web.Response(status=307)
        response.headers["Location"] = self._media.signed_url(recording_id, ttl)
        return response

    async def _list(self, request: web.Request) -> web.StreamResponse:
        if not self._workspace_ok(request):
            return _error(404, "NotFound", "workspace not found")
        query = request.query
        try:
            limit = int(query.get("limit", "20"))
            offset = _decode_token(query.get("pageToken"))
            since = _parse_time(query.get("startAt"))
            until = _parse_time(query.get("endAt"))
        except ValueError as exc:
            return _error(422, "InvalidParameter", str(exc))
        if not 1 <= limit <= 99:
            return _error(422, "InvalidParameter", "limit must be between 1 and 99")
        fault = await self.request_faults(request, f"list:{offset}:{limit}")
        if fault is not None:
            return fault
        status = query.get("status")
        matching = [
            payload
            for payload in self._state.dataset.listing()
            if (status is None or payload["status"] == status)
            and (since is None or _parse_time(payload["createdAt"]) >= since)  # type: ignore[operator]
            and (until is None or _parse_time(payload["createdAt"]) < until)  # type: ignore[operator]
            and not self._state.faults.hits_recording("404", payload["id"])
        ]
        page = matching[offset : offset + limit]
        body: dict[str, Any] = {"results": page}
        if offset + limit < len(matching):
            body["nextPageToken"] = _encode_token(offset + limit)
        return _json(body)

    async def _delete(self, request: web.Request) -> web.StreamResponse:
        if not self._workspace_ok(request):
            return _error(404, "NotFound", "workspace not found")
        recording_id = request.match_info["recording"]
        if not _is_uuid(recording_id):
            return _error(422, "InvalidParameter", "recordingId must be a UUID")
        if not self._state.dataset.delete_media(recording_id):
            return _error(404, "NotFound", "recording not found")
        return web.Response(status=204)

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        return _json(self._state.stats.snapshot())

    async def _ids(self, request: web.Request) -> web.StreamResponse:
        # Streamed in blocks: a million IDs are 37 MB, never one string.
        ids = self._state.dataset.all_ids
        response = web.StreamResponse()
        response.content_type = "text/plain"
        response.charset = "utf-8"
        await response.prepare(request)
        for start in range(0, len(ids), 10_000):
            await response.write(
                "".join(f"{rid}\n" for rid in ids[start : start + 10_000]).encode()
            )
        await response.write_eof()
        return response


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return len(value) == 36


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(body).encode(), content_type="application/json"
    )


def _error(status: int, code: str, message: str) -> web.Response:
    return _json({"code": code, "message": message}, status)


def _encode_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode()


def _decode_token(token: str | None) -> int:
    if not token:
        return 0
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
        prefix, _, number = text.partition(":")
        if prefix != "o":
            raise ValueError
        return int(number)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("pageToken is not valid") from None


def _parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not an ISO 8601 timestamp: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
