"""Async client of Bird's recordings API over an injected :class:`httpx.AsyncClient`.

Every API request goes through :meth:`BirdClient._send`, which paces it (shared
:class:`~recarchive.bird.ratelimit.RequestPacer`), retries it under a
:class:`~recarchive.bird.retry.RetryPolicy`, and translates the outcome into the project's
error tree. This is the only retry layer for Bird requests: callers never retry a request
themselves.

The access key is added per request to API requests only; the media download goes to the
presigned URL with no ``Authorization`` header, because real S3 rejects a presigned request
that carries one, and because the key must never leave for another host.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import httpx
from pydantic import SecretStr

from recarchive.bird.ratelimit import RequestPacer
from recarchive.bird.retry import RetryPolicy, parse_retry_after
from recarchive.errors import (
    AuthError,
    ClientRequestError,
    InvalidRedirectError,
    MediaIntegrityError,
    MediaLinkExpiredError,
    NotFoundError,
    PayloadError,
    RateLimitedError,
    RecarchiveError,
    RetryableError,
    ServerError,
    TransportError,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: Fresh redirects asked for when presigned URLs keep answering 403 (expired).
MAX_LINK_REFRESHES = 3
PAGE_SIZE = 99
MEDIA_CHUNK_BYTES = 1024 * 1024


class MediaDownload:
    """An open media response from the presigned URL, streamed by the caller.

    Attributes:
        recording_id: The recording.
        content_length: ``Content-Length`` of the media host's answer, if it sent one.
        content_type: ``Content-Type`` of the answer.
        bytes_read: Bytes streamed so far.
    """

    def __init__(self, recording_id: str, response: httpx.Response) -> None:
        self.recording_id = recording_id
        self._response = response
        length = response.headers.get("Content-Length")
        self.content_length = int(length) if length and length.isdigit() else None
        self.content_type = response.headers.get("Content-Type")
        self.bytes_read = 0

    async def iter_bytes(self, chunk_size: int = MEDIA_CHUNK_BYTES) -> AsyncIterator[bytes]:
        """Yield the body in chunks.

        Raises:
            TransportError: The connection broke or timed out mid-body.
            MediaIntegrityError: The body is shorter or longer than ``Content-Length``.
        """
        # Pieces arrive as the transport reads them (16 KiB from aiohttp); they are joined
        # here into blocks of about ``chunk_size``, one copy per byte. httpx's own
        # ``aiter_bytes(chunk_size)`` re-chunks through a BytesIO: three copies and slicing,
        # 8 % of the client's CPU in bench/media_throughput.py (sampled with py-spy).
        pieces: list[bytes] = []
        pending = 0
        try:
            async for piece in self._response.aiter_bytes():
                self.bytes_read += len(piece)
                pieces.append(piece)
                pending += len(piece)
                if pending >= chunk_size:
                    yield b"".join(pieces)
                    pieces.clear()
                    pending = 0
            if pieces:
                yield b"".join(pieces)
        except httpx.HTTPError as exc:
            raise TransportError(
                f"media of {self.recording_id}: download broke after {self.bytes_read} bytes "
                f"({type(exc).__name__})"
            ) from exc
        if self.content_length is not None and self.bytes_read != self.content_length:
            raise MediaIntegrityError(
                f"media of {self.recording_id}: got {self.bytes_read} bytes, "
                f"Content-Length said {self.content_length}"
            )


class BirdClient:
    """Bird recordings API of one workspace.

    Args:
        http: The HTTP client (injected; the caller owns and closes it).
        api_url: API base URL, e.g. ``https://api.bird.com``.
        workspace_id: Workspace of every request.
        access_key: The secret key; only ever sent in API ``Authorization`` headers.
        auth_scheme: ``AccessKey`` or ``Bearer``.
        pacer: Request pacing shared by every request of the process.
        retry: Retry policy of every request.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        api_url: str,
        workspace_id: str,
        access_key: SecretStr,
        auth_scheme: str = "AccessKey",
        pacer: RequestPacer | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._http = http
        self.api_url = api_url.rstrip("/")
        self.workspace_id = workspace_id
        self._access_key = access_key
        self.auth_scheme = auth_scheme
        self.pacer = pacer or RequestPacer(50)
        self.retry = retry or RetryPolicy()
        self._base = f"{self.api_url}/workspaces/{quote(workspace_id, safe='')}/recordings"
        self.stats: dict[str, int] = {"requests": 0, "retries": 0, "rate_limited": 0}

    def __repr__(self) -> str:
        return f"BirdClient(api_url={self.api_url!r}, workspace_id={self.workspace_id!r})"

    # --- public calls ------------------------------------------------------------------------

    async def get_recording(self, recording_id: str) -> dict[str, Any]:
        """Return a recording's metadata payload.

        Raises:
            NotFoundError: Bird does not know the recording (404).
            ClientRequestError: Another 4xx (e.g. 422 for a malformed ID).
            PayloadError: The answer is not a JSON object.
            RetryableError: Still failing after the retries.
            AuthError: The key was refused (stops the run).
        """
        response = await self._send("GET", self._url(recording_id), what=recording_id)
        return _json_object(response, f"recording {recording_id}")

    async def list_recordings(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        status: str | None = None,
        page_size: int = PAGE_SIZE,
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield every recording of the list endpoint, page after page.

        The window is half-open, ``since <= createdAt < until``; it is sent to the API and
        also applied here, so an API that treats ``endAt`` as inclusive cannot widen it.

        Raises:
            PayloadError: A page is not of the documented shape.
        """
        params: dict[str, str] = {"limit": str(page_size)}
        if since is not None:
            params["startAt"] = _api_time(since)
        if until is not None:
            params["endAt"] = _api_time(until)
        if status is not None:
            params["status"] = status
        token: str | None = None
        pages = 0
        while True:
            page_params = dict(params)
            if token:
                page_params["pageToken"] = token
            response = await self._send(
                "GET", self._base, params=page_params, what=f"list page {pages + 1}"
            )
            body = _json_object(response, f"list page {pages + 1}")
            results = body.get("results")
            if not isinstance(results, list):
                raise PayloadError(
                    f"list page {pages + 1}: 'results' is not a list", field="results"
                )
            for item in results:
                if isinstance(item, dict) and _in_window(item, since, until):
                    yield item
            pages += 1
            next_token = body.get("nextPageToken")
            if not next_token or not isinstance(next_token, str) or next_token == token:
                return
            token = next_token

    @asynccontextmanager
    async def open_media(self, recording_id: str) -> AsyncIterator[MediaDownload]:
        """Open a recording's MP3 through the API's 307 redirect.

        The redirect is requested without following it; its ``Location`` must be an absolute
        http(s) URL and must not downgrade https to http. The presigned URL is fetched with no
        ``Authorization`` header; when it answers 403 (expired), a fresh redirect is asked for.

        Yields:
            The open download; stream it with :meth:`MediaDownload.iter_bytes`.

        Raises:
            NotFoundError: No such recording, or its media is not there (any more).
            InvalidRedirectError: The API did not redirect, or to an unsafe place.
            MediaLinkExpiredError: Fresh presigned URLs kept being refused.
            RetryableError: The media host kept failing.
        """
        for _refresh in range(MAX_LINK_REFRESHES):
            location = await self._media_location(recording_id)
            response = await self._open_presigned(recording_id, location)
            if response is None:
                continue  # expired: ask the API for a fresh redirect
            try:
                yield MediaDownload(recording_id, response)
            finally:
                await response.aclose()
            return
        raise MediaLinkExpiredError(
            f"media of {recording_id}: presigned URL refused {MAX_LINK_REFRESHES} times"
        )

    async def delete_recording(self, recording_id: str) -> None:
        """Delete a recording's media at Bird (irreversible).

        Raises:
            NotFoundError: Already gone.
        """
        await self._send("DELETE", self._url(recording_id), what=f"delete {recording_id}")

    # --- internals ---------------------------------------------------------------------------

    def _url(self, recording_id: str, suffix: str = "") -> str:
        return f"{self._base}/{quote(recording_id, safe='')}{suffix}"

    def _auth_headers(self) -> dict[str, str]:
        return {
            "Authorization": f"{self.auth_scheme} {self._access_key.get_secret_value()}",
            "Accept": "application/json",
        }

    async def _send(
        self,
        method: str,
        url: str,
        *,
        what: str,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        """Send one API request with pacing and retries; return a 2xx or 3xx response."""

        async def attempt() -> httpx.Response:
            await self.pacer.wait()
            self.stats["requests"] += 1
            try:
                response = await self._http.request(
                    method,
                    url,
                    params=params,
                    headers=self._auth_headers(),
                    follow_redirects=False,
                )
            except httpx.TimeoutException as exc:
                raise TransportError(f"{what}: timed out ({type(exc).__name__})") from exc
            except httpx.HTTPError as exc:
                raise TransportError(f"{what}: connection failed ({type(exc).__name__})") from exc
            error = _classify(response, what)
            if error is not None:
                raise error
            self.pacer.record_success()
            return response

        return await self._with_retries(attempt, what=what, paced=True)

    async def _with_retries(
        self, attempt: Callable[[], Awaitable[T]], *, what: str, paced: bool
    ) -> T:
        """Run ``attempt`` until it succeeds, fails for good, or the retry policy says stop.

        When the policy stops, the last error is raised saying how many attempts were made.
        The one retry loop of Bird requests, API and media host alike. ``paced``: a 429 is
        the workspace's limit, so it pauses every sender of the API (not the media host's).
        """
        started = time.monotonic()
        number = 0
        while True:
            number += 1
            try:
                return await attempt()
            except RetryableError as error:
                delay = self.retry.delay(number, error.retry_after)
                if paced and isinstance(error, RateLimitedError):
                    self.stats["rate_limited"] += 1
                    self.pacer.pause(delay)
                if not self.retry.may_retry(number, time.monotonic() - started, delay):
                    raise type(error)(
                        f"{error} (gave up after {number} attempts)",
                        retry_after=error.retry_after,
                    ) from error.__cause__
                self.stats["retries"] += 1
                logger.debug("%s: %s; retry %d in %.2fs", what, error, number, delay)
                await asyncio.sleep(delay)

    async def _media_location(self, recording_id: str) -> str:
        response = await self._send(
            "GET", self._url(recording_id, ".mp3"), what=f"media link of {recording_id}"
        )
        if response.status_code not in REDIRECT_STATUSES:
            raise InvalidRedirectError(
                f"media of {recording_id}: expected a redirect, got HTTP {response.status_code}"
            )
        location = str(response.headers.get("Location", ""))
        parts = urlsplit(location)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InvalidRedirectError(
                f"media of {recording_id}: redirect to a non-absolute URL "
                f"({_without_query(location)!r})"
            )
        if urlsplit(self.api_url).scheme == "https" and parts.scheme != "https":
            raise InvalidRedirectError(
                f"media of {recording_id}: redirect downgrades https to http "
                f"({_without_query(location)!r})"
            )
        return location

    async def _open_presigned(self, recording_id: str, location: str) -> httpx.Response | None:
        """GET the presigned URL with retries; ``None`` when it answered 403 (expired)."""
        what = f"media of {recording_id} from {_without_query(location)}"

        async def attempt() -> httpx.Response | None:
            request = self._http.build_request("GET", location)
            # Defence in depth: whatever defaults the injected client has, no credentials
            # travel to the media host.
            request.headers.pop("Authorization", None)
            try:
                response = await self._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise TransportError(f"{what}: connection failed ({type(exc).__name__})") from exc
            if response.status_code == 200:
                return response
            await response.aclose()
            # 403 is how S3 says "expired"; 401 from a presigned URL's host cannot be about
            # our key (it was never sent there): ask the API for a fresh link.
            if response.status_code in (401, 403):
                logger.info("presigned URL of %s refused (expired); asking again", recording_id)
                return None
            raise _classify(response, what) or InvalidRedirectError(
                f"{what}: unexpected HTTP {response.status_code}"
            )

        return await self._with_retries(attempt, what=what, paced=False)


def _classify(response: httpx.Response, what: str) -> RecarchiveError | None:
    """Translate a status code into our error tree; ``None`` for 2xx and 3xx."""
    status = response.status_code
    if status < 400:
        return None
    if status == 429:
        return RateLimitedError(
            f"{what}: HTTP 429 rate limited",
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
        )
    if status in (401, 403):
        return AuthError(
            f"{what}: HTTP {status}: Bird refused the access key "
            "(check RECARCHIVE_BIRD_ACCESS_KEY and RECARCHIVE_BIRD_AUTH_SCHEME)"
        )
    if status == 404:
        return NotFoundError(f"{what}: not found (HTTP 404)")
    if status >= 500 and status != 501:
        return ServerError(
            f"{what}: HTTP {status}",
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
        )
    return ClientRequestError(f"{what}: HTTP {status}", status_code=status)


def _json_object(response: httpx.Response, what: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError as exc:
        raise PayloadError(f"{what}: answer is not JSON", field="<body>") from exc
    if not isinstance(body, dict):
        raise PayloadError(f"{what}: answer is not a JSON object", field="<body>")
    return body


def _without_query(url: str) -> str:
    """Scheme, host and path only: a presigned URL's query string is a credential."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _api_time(moment: datetime) -> str:
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _in_window(item: dict[str, Any], since: datetime | None, until: datetime | None) -> bool:
    if since is None and until is None:
        return True
    created = item.get("createdAt")
    if not isinstance(created, str):
        return True  # let normalization report the broken payload rather than drop it
    try:
        moment = datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        return True
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (since is None or moment >= since) and (until is None or moment < until)
