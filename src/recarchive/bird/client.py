"""Async client of Bird's recordings API over an injected :class:`httpx.AsyncClient`.

Every API request goes through :meth:`BirdClient.send`, which paces it (shared
:class:`~recarchive.bird.ratelimit.RequestPacer`), retries it under a
:class:`~recarchive.bird.retry.RetryPolicy`, and reads the answer through
:mod:`recarchive.bird.answer`, which translates every failure into the project's error tree.
This is the only retry layer for Bird requests: callers never retry a request themselves.

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

from recarchive.bird.answer import (
    NOT_A_CHILD,
    REDIRECT_STATUSES,
    Answer,
    MediaDownload,
    child_url,
    classify,
    new_request,
    read_answer,
    send_for_headers,
)
from recarchive.bird.integrity import plain_md5_etag
from recarchive.bird.limits import AnswerLimits, parse_json_object
from recarchive.bird.ratelimit import RequestPacer
from recarchive.bird.redirect import RedirectPolicy
from recarchive.bird.retry import RetryPolicy
from recarchive.errors import (
    ClientRequestError,
    InvalidRedirectError,
    MediaLinkExpiredError,
    PayloadError,
    RateLimitedError,
    RetryableError,
)
from recarchive.redaction import strip_url

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: Fresh redirects asked for when presigned URLs keep answering 403 (expired).
MAX_LINK_REFRESHES = 3
PAGE_SIZE = 99
#: Asked of every host: lengths, checksums and limits then apply to the bytes we keep.
IDENTITY = "identity"


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
        self._base_url = httpx.URL(self._base)
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
        answer = await self.send("GET", self._url(recording_id), what=recording_id)
        return self.json_object(answer, f"recording {recording_id}")

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
            answer = await self.send(
                "GET", self._base, params=page_params, what=f"list page {pages + 1}"
            )
            body = self.json_object(answer, f"list page {pages + 1}")
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
                await download.aclose()
            return
        raise MediaLinkExpiredError(
            f"media of {recording_id}: presigned URL refused {MAX_LINK_REFRESHES} times"
        )

    async def delete_recording(self, recording_id: str) -> None:
        """Delete a recording's media at Bird (irreversible).

        Raises:
            NotFoundError: Already gone.
        """
        await self.send(
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
            # No credentials travel to the media host: new_request adds no client defaults.
            request = new_request(
                self._http,
                "GET",
                location,
                headers={"Range": "bytes=0-0", "Accept-Encoding": IDENTITY},
            )
            response = await send_for_headers(self._http, request, limits=self.limits, what=what)
            try:
                if response.status_code in (401, 403):
                    # Never about our key (not sent there): an expired link, or S3's answer
                    # for a key that is gone. Either way nothing proves the source's size.
                    raise InvalidRedirectError(
                        f"{what}: the media host refused the range request "
                        f"(HTTP {response.status_code})"
                    )
                if response.status_code != 206:
                    raise classify(response, what) or InvalidRedirectError(
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

    def _url(self, recording_id: str, suffix: str = "") -> httpx.URL:
        """The URL of ``recording_id`` (plus ``suffix``) under its collection.

        Raises:
            ClientRequestError: The ID is empty, ``.`` or ``..``: its URL would be the
                collection's or the workspace's, not a recording's (nothing is sent).
        """
        if recording_id in NOT_A_CHILD:  # "..mp3" is a child; ".." is not, whatever follows
            raise ClientRequestError(f"not a recording ID: {recording_id!r}", status_code=None)
        return child_url(self._base_url, recording_id + suffix)

    def _auth_headers(self) -> dict[str, str]:
        return {
            "Authorization": f"{self.auth_scheme} {self._access_key.get_secret_value()}",
            "Accept": "application/json",
            "Accept-Encoding": IDENTITY,
        }

    async def send(
        self,
        method: str,
        url: str | httpx.URL,
        *,
        what: str,
        params: dict[str, str] | None = None,
        read_body: bool = True,
        limits: AnswerLimits | None = None,
    ) -> Answer:
        """Send one API request with pacing and retries; return a 2xx or 3xx answer.

        The body is read inside the attempt (a connection that breaks mid-body is retried)
        within ``limits`` (default: the client's); see :func:`~recarchive.bird.answer.read_answer`.
        """

        async def attempt() -> Answer:
            await self.pacer.wait()
            self.stats["requests"] += 1
            request = new_request(
                self._http, method, url, params=params, headers=self._auth_headers()
            )
            answer = await read_answer(
                self._http, request, limits=limits or self.limits, what=what, read_body=read_body
            )
            self.pacer.record_success()
            return answer

        return await self._with_retries(attempt, what=what, paced=True)

    def json_object(self, answer: Answer, what: str) -> dict[str, Any]:
        """``answer``'s body as a JSON object, strictly and within the depth limit."""
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
        answer = await self.send("GET", self._url(recording_id, ".mp3"), what=what)
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
            # Whatever defaults the injected client has, no credentials travel to the media
            # host: new_request adds none of them.
            request = new_request(
                self._http, "GET", location, headers={"Accept-Encoding": IDENTITY}
            )
            response = await send_for_headers(self._http, request, limits=self.limits, what=what)
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
            raise classify(response, what) or InvalidRedirectError(
                f"{what}: unexpected HTTP {response.status_code}"
            )

        return await self._with_retries(attempt, what=what, paced=False)


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
