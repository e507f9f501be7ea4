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
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from recarchive.bird.integrity import BodyCheck, plain_md5_etag
from recarchive.bird.limits import AnswerLimits, LowSpeedWatch, decode_body, parse_json_object
from recarchive.bird.ratelimit import RequestPacer
from recarchive.bird.redirect import RedirectPolicy
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
from recarchive.redaction import strip_url

logger = logging.getLogger(__name__)
T = TypeVar("T")

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: Fresh redirects asked for when presigned URLs keep answering 403 (expired).
MAX_LINK_REFRESHES = 3
PAGE_SIZE = 99
MEDIA_CHUNK_BYTES = 1024 * 1024
#: Asked of every host: lengths, checksums and limits then apply to the bytes we keep.
IDENTITY = "identity"


class MediaDownload:
    """An open media response from the presigned URL, streamed by the caller.

    Built inside the client's retry loop, so a malformed ``Content-Length`` or checksum
    header, or a ``Content-Length`` above the size limit, is retried like any failed request
    and never reaches the caller.

    Attributes:
        recording_id: The recording.
        content_length: ``Content-Length`` of the media host's answer, if it sent one.
        content_type: ``Content-Type`` of the answer.
        bytes_read: Bytes streamed so far.
        confirmed_by: After the body was read whole: what confirmed its end
            (``"content-length"``, ``"chunked"``, ``"etag-md5"``, ``"content-md5"``, ...).

    Raises:
        MediaIntegrityError: Malformed framing or checksum headers, or a body larger than
            the limit (announced or found while streaming).
    """

    def __init__(
        self,
        recording_id: str,
        response: httpx.Response,
        *,
        limits: AnswerLimits,
        what: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.recording_id = recording_id
        self._response = response
        self._what = what
        self._limits = limits
        coding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if coding not in ("", "identity"):
            # Asked for identity: a compressed body's length, checksums and end cannot be
            # checked as the bytes we store (and httpx would inflate it unbounded).
            raise MediaIntegrityError(f"{what}: compressed media ({coding[:40]!r}) refused")
        self._check = BodyCheck(response.headers, what)
        self.content_length = self._check.content_length
        if self.content_length is not None and self.content_length > limits.media_max_bytes:
            raise MediaIntegrityError(
                f"{what}: {self.content_length} bytes announced, more than the limit of "
                f"{limits.media_max_bytes} (RECARCHIVE_MEDIA_MAX_BYTES)"
            )
        self.content_type = response.headers.get("Content-Type")
        self.bytes_read = 0
        self.confirmed_by: str | None = None
        self._clock = clock

    async def iter_bytes(self, chunk_size: int = MEDIA_CHUNK_BYTES) -> AsyncIterator[bytes]:
        """Yield the body in chunks; after the last one, the body is confirmed whole.

        Raises:
            TransportError: The connection broke, timed out, or ran below the speed limit.
            MediaIntegrityError: The body is longer than the limit, does not match its length
                or checksum, or nothing independent of the connection confirms its end.
        """
        # Pieces arrive as the transport reads them (16 KiB from aiohttp); they are joined
        # here into blocks of about ``chunk_size``, one copy per byte. httpx's own
        # ``aiter_bytes(chunk_size)`` re-chunks through a BytesIO: three copies and slicing,
        # 8 % of the client's CPU in bench/media_throughput.py (sampled with py-spy).
        limits, check = self._limits, self._check
        watch = LowSpeedWatch(
            limits.low_speed_bytes, limits.low_speed_seconds, self._what, clock=self._clock
        )
        pieces: list[bytes] = []
        pending = 0
        try:
            async for piece in _raw_pieces(self._response):
                self.bytes_read += len(piece)
                if self.bytes_read > limits.media_max_bytes:
                    raise MediaIntegrityError(
                        f"{self._what}: more than {limits.media_max_bytes} bytes "
                        "(RECARCHIVE_MEDIA_MAX_BYTES); aborted"
                    )
                watch.add(len(piece))
                check.update(piece)
                pieces.append(piece)
                pending += len(piece)
                if pending >= chunk_size:
                    yield b"".join(pieces)
                    pieces.clear()
                    pending = 0
            if pieces:
                yield b"".join(pieces)
        except RecarchiveError:
            raise
        except Exception as exc:  # httpx.HTTPError, or a transport's own untranslated error
            raise TransportError(
                f"{self._what}: download broke after {self.bytes_read} bytes ({type(exc).__name__})"
            ) from exc
        self.confirmed_by = check.finish(self.bytes_read)


@dataclass(frozen=True)
class _Answer:
    """A finished API answer: status, headers and the body (read within the size limit)."""

    status_code: int
    headers: httpx.Headers
    content: bytes


@dataclass(frozen=True)
class SourceSize:
    """What the media host reports about a recording's MP3 when asked for its first byte.

    Attributes:
        total_bytes: The total size from ``Content-Range``.
        md5: The ETag when it is a plain MD5 (lower-case hex), else ``None``.
    """

    total_bytes: int
    md5: str | None


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
        limits: Size, depth and speed limits of answers.
        redirects: Where media redirects may go (by default: the rules of
            :mod:`recarchive.bird.redirect` for ``api_url`` and ``limits.allowed_hosts``).
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
        limits: AnswerLimits | None = None,
        redirects: RedirectPolicy | None = None,
    ) -> None:
        self._http = http
        self.api_url = api_url.rstrip("/")
        self.workspace_id = workspace_id
        self._access_key = access_key
        self.auth_scheme = auth_scheme
        self.pacer = pacer or RequestPacer(50)
        self.retry = retry or RetryPolicy()
        self.limits = limits or AnswerLimits()
        self.redirects = redirects or RedirectPolicy(
            self.api_url, allowed_hosts=self.limits.allowed_hosts
        )
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
        answer = await self._send("GET", self._url(recording_id), what=recording_id)
        return self._json_object(answer, f"recording {recording_id}")

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
            PayloadError: A page is not of the documented shape, or repeats the page token
                it was asked with (the listing would end short).
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
            answer = await self._send(
                "GET", self._base, params=page_params, what=f"list page {pages + 1}"
            )
            body = self._json_object(answer, f"list page {pages + 1}")
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
            if not next_token:
                return
            if not isinstance(next_token, str):
                raise PayloadError(
                    f"list page {pages}: 'nextPageToken' is not a string", field="nextPageToken"
                )
            if next_token == token:
                # Not a last page (that has no token): the listing would stop short and the
                # window be taken as listed completely.
                raise PayloadError(
                    f"list page {pages}: the API repeated its page token; listing stopped",
                    field="nextPageToken",
                )
            token = next_token

    @asynccontextmanager
    async def open_media(self, recording_id: str) -> AsyncIterator[MediaDownload]:
        """Open a recording's MP3 through the API's 307 redirect.

        The redirect is requested without following it; its ``Location`` must pass the
        :class:`~recarchive.bird.redirect.RedirectPolicy`. The presigned URL is fetched with no
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
            download = await self._open_presigned(recording_id, location)
            if download is None:
                continue  # expired: ask the API for a fresh redirect
            try:
                yield download
            finally:
                await download._response.aclose()
            return
        raise MediaLinkExpiredError(
            f"media of {recording_id}: presigned URL refused {MAX_LINK_REFRESHES} times"
        )

    async def delete_recording(self, recording_id: str) -> None:
        """Delete a recording's media at Bird (irreversible).

        Raises:
            NotFoundError: Already gone.
        """
        await self._send(
            "DELETE", self._url(recording_id), what=f"delete {recording_id}", read_body=False
        )

    async def source_size(self, recording_id: str) -> SourceSize:
        """Ask the media host, through a fresh redirect, for the MP3's total size.

        A ``Range: bytes=0-0`` GET, because real S3 refuses a HEAD on a URL presigned for GET;
        the answer must be ``206`` with a ``Content-Range`` that names the total.

        Raises:
            InvalidRedirectError: No usable redirect, or the host did not answer the range.
            RetryableError: The media host kept failing.
        """
        location = await self._media_location(recording_id)
        what = f"size of the media of {recording_id} at {strip_url(location)}"

        async def attempt() -> SourceSize:
            request = self._http.build_request(
                "GET", location, headers={"Range": "bytes=0-0", "Accept-Encoding": IDENTITY}
            )
            request.headers.pop("Authorization", None)
            response = await self._headers_within_deadline(request, what)
            try:
                if response.status_code in (401, 403):
                    # Never about our key (not sent there): an expired link, or S3's answer
                    # for a key that is gone. Either way nothing proves the source's size.
                    raise InvalidRedirectError(
                        f"{what}: the media host refused the range request "
                        f"(HTTP {response.status_code})"
                    )
                if response.status_code != 206:
                    raise _classify(response, what) or InvalidRedirectError(
                        f"{what}: expected 206 to a range request, got {response.status_code}"
                    )
                total = _content_range_total(response.headers.get("Content-Range"))
                if total is None:
                    raise InvalidRedirectError(f"{what}: no total size in Content-Range")
                md5 = plain_md5_etag(response.headers.get("etag"))
                return SourceSize(total_bytes=total, md5=md5)
            finally:
                await response.aclose()

        return await self._with_retries(attempt, what=what, paced=False)

    # --- internals ---------------------------------------------------------------------------

    def _url(self, recording_id: str, suffix: str = "") -> str:
        return f"{self._base}/{quote(recording_id, safe='')}{suffix}"

    def _auth_headers(self) -> dict[str, str]:
        return {
            "Authorization": f"{self.auth_scheme} {self._access_key.get_secret_value()}",
            "Accept": "application/json",
            "Accept-Encoding": IDENTITY,
        }

    async def _send(
        self,
        method: str,
        url: str,
        *,
        what: str,
        params: dict[str, str] | None = None,
        read_body: bool = True,
    ) -> _Answer:
        """Send one API request with pacing and retries; return a 2xx or 3xx answer.

        The body is read inside the attempt (a connection that breaks mid-body is retried)
        and refused past ``limits.metadata_max_bytes`` before anything parses it.
        """

        async def attempt() -> _Answer:
            await self.pacer.wait()
            self.stats["requests"] += 1
            request = self._http.build_request(
                method, url, params=params, headers=self._auth_headers()
            )
            try:
                async with asyncio.timeout(self.limits.answer_seconds):
                    response = await self._transport(request, what)
                    try:
                        error = _classify(response, what)
                        if error is not None:
                            raise error
                        content = b""
                        if read_body and response.status_code not in REDIRECT_STATUSES:
                            content = await self._read_limited(response, what)
                    finally:
                        await response.aclose()
            except TimeoutError as exc:
                raise TransportError(
                    f"{what}: no whole answer within {self.limits.answer_seconds:.0f}s"
                ) from exc
            self.pacer.record_success()
            return _Answer(response.status_code, response.headers, content)

        return await self._with_retries(attempt, what=what, paced=True)

    async def _transport(self, request: httpx.Request, what: str) -> httpx.Response:
        """Send ``request`` streaming; every transport failure becomes a :class:`TransportError`.

        The boundary to httpx and its transport: a malformed status line or header raises the
        transport's own exception types (aiohttp's ``ClientResponseError`` is not mapped by
        httpx-aiohttp), whose messages quote the URL; only the type name is kept here.
        """
        try:
            return await self._http.send(request, stream=True, follow_redirects=False)
        except httpx.TimeoutException as exc:
            raise TransportError(f"{what}: timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise TransportError(f"{what}: connection failed ({type(exc).__name__})") from exc
        except Exception as exc:
            raise TransportError(f"{what}: malformed answer ({type(exc).__name__})") from exc

    async def _headers_within_deadline(self, request: httpx.Request, what: str) -> httpx.Response:
        """:meth:`_transport` for the media host: its headers within ``answer_seconds``.

        The body that follows is bounded by the size and low-speed limits instead.
        """
        try:
            async with asyncio.timeout(self.limits.answer_seconds):
                return await self._transport(request, what)
        except TimeoutError as exc:
            raise TransportError(
                f"{what}: no answer headers within {self.limits.answer_seconds:.0f}s"
            ) from exc

    async def _read_limited(self, response: httpx.Response, what: str) -> bytes:
        """The answer's body: at most ``metadata_max_bytes`` on the wire and once decoded.

        Read raw (httpx's decoding inflates before any limit applies) and decoded here by
        :func:`~recarchive.bird.limits.decode_body`; a body slower than the low-speed limit is
        aborted like a media download.
        """
        limit = self.limits.metadata_max_bytes
        refused = PayloadError(
            f"{what}: answer larger than {limit} bytes (RECARCHIVE_METADATA_MAX_BYTES); "
            "refused unparsed",
            field="<body>",
        )
        announced = response.headers.get("Content-Length", "")
        if announced.isdigit() and int(announced) > limit:
            raise refused
        watch = LowSpeedWatch(self.limits.low_speed_bytes, self.limits.low_speed_seconds, what)
        pieces: list[bytes] = []
        size = 0
        try:
            async for piece in _raw_pieces(response):
                size += len(piece)
                if size > limit:
                    raise refused
                watch.add(len(piece))
                pieces.append(piece)
        except RecarchiveError:
            raise
        except httpx.TimeoutException as exc:
            raise TransportError(f"{what}: timed out mid-answer ({type(exc).__name__})") from exc
        except Exception as exc:
            raise TransportError(f"{what}: answer broke off ({type(exc).__name__})") from exc
        return decode_body(
            b"".join(pieces), response.headers.get("Content-Encoding"), limit=limit, what=what
        )

    def _json_object(self, answer: _Answer, what: str) -> dict[str, Any]:
        return parse_json_object(answer.content, what, max_depth=self.limits.json_max_depth)

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
        what = f"media link of {recording_id}"
        answer = await self._send("GET", self._url(recording_id, ".mp3"), what=what)
        if answer.status_code not in REDIRECT_STATUSES:
            raise InvalidRedirectError(
                f"media of {recording_id}: expected a redirect, got HTTP {answer.status_code}"
            )
        location = str(answer.headers.get("Location", ""))
        what = f"media of {recording_id}"
        parts = self.redirects.parse(location, what)
        # A failed lookup is transient: retried like a failed request.
        await self._with_retries(
            lambda: self.redirects.check_target(parts, what), what=what, paced=False
        )
        return location

    async def _open_presigned(self, recording_id: str, location: str) -> MediaDownload | None:
        """GET the presigned URL with retries; ``None`` when it answered 403 (expired)."""
        what = f"media of {recording_id} from {strip_url(location)}"

        async def attempt() -> MediaDownload | None:
            request = self._http.build_request(
                "GET", location, headers={"Accept-Encoding": IDENTITY}
            )
            # Defence in depth: whatever defaults the injected client has, no credentials
            # travel to the media host.
            request.headers.pop("Authorization", None)
            response = await self._headers_within_deadline(request, what)
            if response.status_code == 200:
                try:
                    return MediaDownload(recording_id, response, limits=self.limits, what=what)
                except BaseException:
                    await response.aclose()
                    raise
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


async def _raw_pieces(response: httpx.Response) -> AsyncIterator[bytes]:
    """The body as sent (no decoding); a response a transport pre-read is yielded whole."""
    if response.is_stream_consumed:  # e.g. httpx.MockTransport with content=...
        yield response.content
        return
    async for piece in response.aiter_raw():
        yield piece


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


_CONTENT_RANGE = re.compile(r"^bytes [0-9]{1,19}-[0-9]{1,19}/([0-9]{1,19})$", re.ASCII | re.I)


def _content_range_total(value: str | None) -> int | None:
    """The total of ``Content-Range: bytes 0-0/TOTAL``; ``None`` when absent or ``*``."""
    if not value:
        return None
    match = _CONTENT_RANGE.match(value.strip())
    return int(match.group(1)) if match else None


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
