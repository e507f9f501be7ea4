"""The simulator's HTTP servers: the API host and the separate media host.

Both are aiohttp applications on 127.0.0.1, run by :class:`SimulatorServer` on an event loop
in a background thread, so a test (or the demo) can start one in-process and talk to it over
real sockets; :func:`serve` runs one in the foreground for ``recarchive simulate``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

from aiohttp import web

from recarchive.simulator.dataset import Dataset
from recarchive.simulator.faults import FaultProfile
from recarchive.simulator.mp3 import Mp3Source

logger = logging.getLogger(__name__)

DEFAULT_WORKSPACE = "6f1c2a34-8d0e-4b7a-9c11-2f5e8d3b7a10"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: Set on a request the handler logged itself (streamed media).
_LOGGED = web.RequestKey("logged", bool)


@dataclass(frozen=True)
class SimulatorConfig:
    """How the simulator behaves.

    Attributes:
        recordings: Recordings in the dataset.
        seed: Seed of the dataset and of every fault decision.
        faults: Fault profile: a profile name or a comma list (see :mod:`.faults`).
        rate_limit: API requests per second before answering 429 (``None``: unlimited).
        access_key: The only key the API accepts (``AccessKey`` or ``Bearer`` scheme).
        workspace_id: The workspace served.
        port: API port (0 picks a free one).
        media_port: Media host port (0 picks a free one).
        host: Interface to listen on; loopback only.
        media_size_range: Smallest and largest media size in bytes.
        available_fraction: Share of recordings whose media is available.
        url_ttl_seconds: Lifetime of a signed media URL.
    """

    recordings: int = 300
    seed: int = 1
    faults: str = "none"
    rate_limit: float | None = None
    access_key: str = "sim-access-key"
    workspace_id: str = DEFAULT_WORKSPACE
    port: int = 0
    media_port: int = 0
    host: str = "127.0.0.1"
    media_size_range: tuple[int, int] = (4_000, 400_000)
    available_fraction: float = 0.8
    url_ttl_seconds: float = 60.0


@dataclass(frozen=True)
class RequestRecord:
    """One request the simulator received.

    Attributes:
        server: ``api`` or ``media``.
        method: HTTP method.
        path: URL path.
        query: Query parameters.
        status: Status answered (0 when the connection was dropped on purpose).
        auth_scheme: Scheme of the ``Authorization`` header, if any (never the key).
        at: ``time.monotonic()`` when the request arrived.
    """

    server: str
    method: str
    path: str
    query: dict[str, str]
    status: int
    auth_scheme: str | None
    at: float

    @property
    def has_authorization(self) -> bool:
        """True when the request carried an ``Authorization`` header."""
        return self.auth_scheme is not None


class _DroppedConnection(Exception):
    """Raised by a handler that closed the connection on purpose (reset fault)."""


class _HideDroppedConnections(logging.Filter):
    """Keep aiohttp from logging our deliberate connection drops as server errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, _DroppedConnection)


_http_logger = logging.getLogger("recarchive.simulator.http")
_http_logger.addFilter(_HideDroppedConnections())


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


class SimulatorServer:
    """The Bird API simulator: API host and media host on loopback, in a background thread.

    Args:
        config: Dataset, faults and ports.

    Attributes:
        dataset: The recordings served; tests may change it while the server runs.
        requests: Every request received, in arrival order.
    """

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config or SimulatorConfig()
        self.faults = FaultProfile.parse(self.config.faults, self.config.seed)
        self.dataset = Dataset(
            self.config.recordings,
            self.config.seed,
            workspace_id=self.config.workspace_id,
            media_size_range=self.config.media_size_range,
            available_fraction=self.config.available_fraction,
        )
        if self.faults.active("notready"):
            for recording_id in self.dataset.available_ids():
                if self.faults.hits_recording("notready", recording_id):
                    self.dataset.set_status(recording_id, "completed")
        self.requests: list[RequestRecord] = []
        self._attempts: defaultdict[str, int] = defaultdict(int)
        self._bucket = _TokenBucket(self.config.rate_limit) if self.config.rate_limit else None
        self._secret = hashlib.sha256(f"media-signing:{self.config.seed}".encode()).digest()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runners: list[web.AppRunner] = []
        self.port = self.config.port
        self.media_port = self.config.media_port

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        """Base URL of the API host (what ``RECARCHIVE_BIRD_API_URL`` points at)."""
        return f"http://{self.config.host}:{self.port}"

    @property
    def media_url(self) -> str:
        """Base URL of the media host."""
        return f"http://{self.config.host}:{self.media_port}"

    def start(self) -> SimulatorServer:
        """Start both servers; returns once they accept connections."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._start_sites())
            except BaseException as exc:  # reported to the starting thread below
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._stop_sites())
            loop.close()

        self._thread = threading.Thread(target=run, name="bird-simulator", daemon=True)
        self._thread.start()
        ready.wait(timeout=30)
        if errors:
            raise RuntimeError(f"simulator did not start: {errors[0]}") from errors[0]
        return self

    def stop(self) -> None:
        """Stop both servers and their thread."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        self._loop = None
        self._thread = None

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def _start_sites(self) -> None:
        api = web.Application(middlewares=[self._api_middleware])
        ws = "/workspaces/{workspace}/recordings"
        api.router.add_get(ws, self._list)
        api.router.add_get(ws + "/{recording}", self._get)
        api.router.add_delete(ws + "/{recording}", self._delete)
        media = web.Application(middlewares=[self._media_middleware])
        media.router.add_get("/media/{workspace}/{recording}.mp3", self._media)
        for app, attr in ((api, "port"), (media, "media_port")):
            runner = web.AppRunner(app, access_log=None, handle_signals=False, logger=_http_logger)
            await runner.setup()
            site = web.TCPSite(runner, self.config.host, getattr(self, attr), backlog=1024)
            await site.start()
            self._runners.append(runner)
            server = site._server
            assert server is not None
            sockets = getattr(server, "sockets", None) or []
            setattr(self, attr, sockets[0].getsockname()[1])

    async def _stop_sites(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()

    # --- request log ---------------------------------------------------------------------

    @property
    def leaks(self) -> list[RequestRecord]:
        """Requests to the media host that carried an ``Authorization`` header."""
        return [r for r in self.requests if r.server == "media" and r.has_authorization]

    def api_requests(self, path_suffix: str | None = None) -> list[RequestRecord]:
        """API requests, optionally only those whose path ends with ``path_suffix``."""
        return [
            r
            for r in self.requests
            if r.server == "api" and (path_suffix is None or r.path.endswith(path_suffix))
        ]

    def media_requests(self) -> list[RequestRecord]:
        """Requests to the media host."""
        return [r for r in self.requests if r.server == "media"]

    def clear_requests(self) -> None:
        """Forget the request log (tests that count the requests of a second run)."""
        self.requests = []

    def _log(self, server: str, request: web.Request, status: int) -> None:
        header = request.headers.get("Authorization")
        scheme = header.split(" ", 1)[0] if header else None
        self.requests.append(
            RequestRecord(
                server,
                request.method,
                request.path,
                dict(request.query),
                status,
                scheme,
                time.monotonic(),
            )
        )

    def _attempt(self, key: str) -> int:
        attempt = self._attempts[key]
        self._attempts[key] = attempt + 1
        return attempt

    # --- middlewares -----------------------------------------------------------------------

    @web.middleware
    async def _api_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await self._api_checks(request) or await handler(request)
        except _DroppedConnection:
            self._log("api", request, 0)
            raise
        except web.HTTPException as exc:
            self._log("api", request, exc.status)
            raise
        self._log("api", request, response.status)
        return response

    async def _api_checks(self, request: web.Request) -> web.StreamResponse | None:
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme not in ("AccessKey", "Bearer") or not hmac.compare_digest(
            key.encode(), self.config.access_key.encode()
        ):
            return _error(401, "Unauthorized", "missing or invalid access key")
        if self._bucket is not None:
            wait = self._bucket.take()
            if wait > 0:
                response = _error(429, "TooManyRequests", "rate limit exceeded")
                response.headers["Retry-After"] = str(max(1, round(wait + 0.5)))
                return response
        return None

    @web.middleware
    async def _media_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except _DroppedConnection:
            if not request.get(_LOGGED):
                self._log("media", request, 0)
            raise
        except web.HTTPException as exc:
            self._log("media", request, exc.status)
            raise
        if not request.get(_LOGGED):
            self._log("media", request, response.status)
        return response

    # --- API handlers ----------------------------------------------------------------------

    async def _request_faults(self, request: web.Request, key: str) -> web.StreamResponse | None:
        """Apply the per-request faults of the profile; a response means "answer this"."""
        attempt = self._attempt(key)
        faults = self.faults
        if faults.hits("slow", key, attempt):
            await asyncio.sleep(faults.slow_seconds)
        if faults.hits("reset", key, attempt):
            _drop(request)
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
        return request.match_info["workspace"] == self.config.workspace_id

    async def _get(self, request: web.Request) -> web.StreamResponse:
        if not self._workspace_ok(request):
            return _error(404, "NotFound", "workspace not found")
        raw = request.match_info["recording"]
        wants_media = raw.endswith(".mp3")
        recording_id = raw.removesuffix(".mp3")
        if not _is_uuid(recording_id):
            return _error(422, "InvalidParameter", "recordingId must be a UUID")
        kind = "link" if wants_media else "meta"
        fault = await self._request_faults(request, f"{kind}:{recording_id}")
        if fault is not None:
            return fault
        payload = self.dataset.payload(recording_id)
        if payload is None or self.faults.hits_recording("404", recording_id):
            return _error(404, "NotFound", "recording not found")
        if not wants_media:
            return _json(payload)
        if not self.dataset.has_media(recording_id):
            return _error(404, "NotFound", "recording media not available")
        expired = self.faults.hits(
            "expired", f"expired:{recording_id}", self._attempt(f"expired:{recording_id}")
        )
        ttl = -5.0 if expired else self.config.url_ttl_seconds
        response = web.Response(status=307)
        response.headers["Location"] = self._signed_url(recording_id, ttl)
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
        fault = await self._request_faults(request, f"list:{offset}:{limit}")
        if fault is not None:
            return fault
        status = query.get("status")
        matching = [
            payload
            for payload in self.dataset.listing()
            if (status is None or payload["status"] == status)
            and (since is None or _parse_time(payload["createdAt"]) >= since)  # type: ignore[operator]
            and (until is None or _parse_time(payload["createdAt"]) < until)  # type: ignore[operator]
            and not self.faults.hits_recording("404", payload["id"])
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
        if not self.dataset.delete_media(recording_id):
            return _error(404, "NotFound", "recording not found")
        return web.Response(status=204)

    # --- media host --------------------------------------------------------------------------

    def _signature(self, recording_id: str, expires: int) -> str:
        message = f"{self.config.workspace_id}/{recording_id}:{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def _signed_url(self, recording_id: str, ttl_seconds: float) -> str:
        expires = int(time.time() + ttl_seconds)
        signature = self._signature(recording_id, expires)
        return (
            f"{self.media_url}/media/{self.config.workspace_id}/{recording_id}.mp3"
            f"?X-Amz-Expires={expires}&X-Amz-Signature={signature}"
        )

    async def _media_range(
        self, request: web.Request, source: Mp3Source, byte_range: tuple[int, int]
    ) -> web.StreamResponse:
        """S3's answer to a range GET: 206 with ``Content-Range`` naming the total size."""
        start, end = byte_range
        self._log("media", request, 206)
        request[_LOGGED] = True
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
        if not self.dataset.has_media(recording_id):
            return _s3_error(404, "NoSuchKey", "The specified key does not exist.")
        key = f"media:{recording_id}"
        attempt = self._attempt(key)
        if self.faults.hits("slow", key, attempt):
            await asyncio.sleep(self.faults.slow_seconds)
        if self.faults.hits("reset", key, attempt):
            _drop(request)
        if self.faults.hits("500", key, attempt):
            return _s3_error(503, "SlowDown", "Please reduce your request rate.")
        source = self.dataset.media(recording_id)
        byte_range = _byte_range(request.headers.get("Range"), source.size)
        if byte_range is not None:
            return await self._media_range(request, source, byte_range)
        truncate = self.faults.hits("truncate", key, attempt)
        # Logged before the body goes out: the client may have read it all before this handler
        # returns, and a test must then find the request in the log. A planned truncation is
        # logged as a dropped connection (status 0).
        self._log("media", request, 0 if truncate else 200)
        request[_LOGGED] = True
        response = web.StreamResponse(status=200)
        response.content_length = source.size
        response.content_type = "audio/mpeg"
        await response.prepare(request)
        limit = source.size // 2 if truncate else None
        for chunk in source.iter_chunks(limit=limit):
            await response.write(chunk)
        if truncate:
            _drop(request)
        await response.write_eof()
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


def _drop(request: web.Request) -> None:
    """Close the connection without a (complete) response."""
    transport = request.transport
    if transport is not None:
        transport.abort()
    raise _DroppedConnection


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


def _s3_error(status: int, code: str, message: str) -> web.Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    )
    return web.Response(status=status, text=body, content_type="application/xml")


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


def serve(config: SimulatorConfig) -> None:
    """Run the simulator in the foreground until interrupted (``recarchive simulate``)."""
    server = SimulatorServer(config)
    server.start()
    print(f"Bird API simulator: {server.api_url}  (media host {server.media_url})", flush=True)
    print(
        f"  workspace {config.workspace_id}, {len(server.dataset.ids)} recordings, "
        f"seed {config.seed}, faults {config.faults!r}, rate limit {config.rate_limit}",
        flush=True,
    )
    print(
        f"  e.g. RECARCHIVE_BIRD_API_URL={server.api_url} "
        f"RECARCHIVE_WORKSPACE_ID={config.workspace_id} "
        f"RECARCHIVE_BIRD_ACCESS_KEY=<the --access-key>",
        flush=True,
    )
    try:
        threading.Event().wait()  # until Ctrl-C or a signal ends the process
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
