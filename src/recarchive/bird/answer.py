"""One answer of Bird or its media host: sent, translated, and read within its limits.

The boundary between :class:`~recarchive.bird.client.BirdClient` and httpx. Every way an
answer can fail becomes an error of the project's tree here: a transport's exception
(:func:`send_streaming`), a status code (:func:`classify`, the status table), a deadline, a
body past its size or below its speed limit (:func:`read_answer`, :class:`MediaDownload`).
What to pace and what to retry is the client's decision, not this module's: nothing here
retries.

Bodies are read raw (``aiter_raw``): httpx's own decoding inflates before any limit applies.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from urllib.parse import quote

import httpx

from recarchive.bird.integrity import BodyCheck
from recarchive.bird.limits import AnswerLimits, LowSpeedWatch, decode_body
from recarchive.bird.retry import parse_retry_after
from recarchive.errors import (
    AuthError,
    ClientRequestError,
    MediaIntegrityError,
    NotFoundError,
    PayloadError,
    RateLimitedError,
    RecarchiveError,
    ServerError,
    TransportError,
)

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MEDIA_CHUNK_BYTES = 1024 * 1024
USER_AGENT = "recarchive"


def new_request(
    http: httpx.AsyncClient,
    method: str,
    url: str | httpx.URL,
    *,
    headers: dict[str, str],
    params: dict[str, str] | None = None,
) -> httpx.Request:
    """One request with exactly ``headers`` (and a ``User-Agent``), for :func:`send_streaming`.

    Built directly rather than with ``http.build_request``: that merges the client's default
    headers and copies its cookie jar into every request, and the client's ``send`` then feeds
    every answer to the jar. Bird's API authenticates by one header and uses no cookies; on a
    metadata GET that merging and extracting was ~20 % of the pipeline's event-loop CPU (py-spy,
    docs/benchmarks.md). It also means no default of the injected client (a header, a cookie)
    ever travels with a request: the caller's ``headers`` are all there is. Only the client's
    timeouts are taken, as ``build_request`` would.

    A request without a body (every one Bird gets) is given its empty body and its ``Host``
    header here, as ``httpx.Request`` would add them: what it does to find out that there is
    no body (encoding it, then rebuilding its headers twice) was half of its ~70 µs a request.
    The request is the same, header for header (tests/test_bird_request.py).
    """
    parsed = httpx.URL(url) if params is None else httpx.URL(url, params=params)
    extensions = {"timeout": http.timeout.as_dict()}
    method = method.upper()
    if method in _METHODS_WITH_BODY or not parsed.host or _names_host(headers):
        # httpx adds a Content-Length of 0 to these: its own construction, unchanged.
        return httpx.Request(
            method,
            parsed,
            headers={"User-Agent": USER_AGENT, **headers},
            extensions=extensions,
        )
    request = httpx.Request(
        method,
        parsed,
        headers={"Host": parsed.netloc.decode("ascii"), "User-Agent": USER_AGENT, **headers},
        stream=_NO_BODY,
        extensions=extensions,
    )
    request.read()  # the transports send ``request.content``: b"", no body and no chunking
    return request


def _names_host(headers: dict[str, str]) -> bool:
    # A caller's own Host header: httpx's construction decides where it goes, not ours.
    return any(name.lower() == "host" for name in headers)


def child_url(base: httpx.URL, segment: str) -> httpx.URL:
    """``base`` with ``/segment`` appended to its path (``segment`` percent-quoted as needed).

    A recording's URL is its collection's plus its ID, and parsing the whole of it again
    (``httpx.URL(text)``: ~40 µs, as much as the rest of the request) is wasted on an ID that
    holds only characters a path keeps as they are: then only the parsed path is replaced,
    in httpx's own parse result of ``base``. Anything else takes the full parse (which also
    applies httpx's limit on a URL's length).

    Args:
        base: The parent URL, without a query or fragment.
        segment: The path segment to append (a recording ID, ``<id>.mp3``).

    Returns:
        The same URL as ``httpx.URL(f"{base}/{quote(segment, safe='')}")``.

    Raises:
        ValueError: ``segment`` is empty, ``.`` or ``..``, which would name ``base`` itself or
            its parent rather than a child (a DELETE of ``..`` would go to the workspace), or
            ``base`` has a query or a fragment (the segment would land in it).
    """
    reference = base._uri_reference  # httpx-internal: see the docstring; equality is tested
    if reference.query is not None or reference.fragment is not None:
        raise ValueError("a child URL of a URL with a query or fragment")
    if segment in NOT_A_CHILD:
        raise ValueError(f"{segment!r} does not name a child path")
    if _PLAIN_SEGMENT.fullmatch(segment) is None or len(segment) > _FAST_SEGMENT_CHARS:
        return httpx.URL(f"{base}/{quote(segment, safe='')}")
    url = httpx.URL.__new__(httpx.URL)
    url._uri_reference = reference._replace(path=f"{reference.path}/{segment}")
    return url


#: A path segment of unreserved characters only (RFC 3986): nothing in it is quoted. Not
#: ``.`` or ``..``: the parse removes those (dot segments).
_PLAIN_SEGMENT = re.compile(r"(?!\.+$)[A-Za-z0-9._~-]+")
#: Segments that would not name a child of the base: the dot segments, and none at all.
NOT_A_CHILD = frozenset({"", ".", ".."})
#: Longer segments take the full parse, so that httpx's URL length limit applies to them.
_FAST_SEGMENT_CHARS = 1024
#: Methods httpx gives a ``Content-Length: 0`` when they have no body.
_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
#: The empty body of a request without one (stateless: shared by every request).
_NO_BODY = httpx.ByteStream(b"")


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

    async def aclose(self) -> None:
        """Close the response (and give its connection back); the body is not read further."""
        await self._response.aclose()


@dataclass(frozen=True)
class Answer:
    """A finished API answer: status, headers and the body (read within the size limit)."""

    status_code: int
    headers: httpx.Headers
    content: bytes


async def read_answer(
    http: httpx.AsyncClient,
    request: httpx.Request,
    *,
    limits: AnswerLimits,
    what: str,
    read_body: bool = True,
) -> Answer:
    """Send ``request`` and read its whole answer within ``limits.answer_seconds``.

    The body (not that of a redirect, nor any with ``read_body=False``) is read inside the
    deadline and refused past ``limits.metadata_max_bytes`` before anything parses it.

    Returns:
        A 2xx or 3xx answer.

    Raises:
        RecarchiveError: What :func:`classify` makes of a 4xx or 5xx status.
        TransportError: The connection failed, or no whole answer came within the deadline.
        PayloadError: The body is larger than the limit.
    """
    try:
        async with asyncio.timeout(limits.answer_seconds):
            response = await send_streaming(http, request, what)
            try:
                error = classify(response, what)
                if error is not None:
                    raise error
                content = b""
                if read_body and response.status_code not in REDIRECT_STATUSES:
                    content = await _read_limited(response, limits, what)
            finally:
                await response.aclose()
    except TimeoutError as exc:
        raise TransportError(
            f"{what}: no whole answer within {limits.answer_seconds:.0f}s"
        ) from exc
    return Answer(response.status_code, response.headers, content)


async def send_streaming(
    http: httpx.AsyncClient, request: httpx.Request, what: str
) -> httpx.Response:
    """Send ``request`` streaming; every transport failure becomes a :class:`TransportError`.

    The boundary to httpx and its transport: a malformed status line or header raises the
    transport's own exception types (aiohttp's ``ClientResponseError`` is not mapped by
    httpx-aiohttp), whose messages quote the URL; only the type name is kept here.

    Raises:
        TransportError: The request timed out, could not connect, or its answer is malformed.
    """
    try:
        # The transport itself, not ``http.send``: redirects are never followed and cookies
        # never kept (see new_request); what the client's send adds besides is its event
        # hooks and logging, and this client has neither (bird.http).
        transport = http._transport_for_url(request.url)
        response = await transport.handle_async_request(request)
        response.request = request
        return response
    except httpx.TimeoutException as exc:
        raise TransportError(f"{what}: timed out ({type(exc).__name__})") from exc
    except httpx.HTTPError as exc:
        raise TransportError(f"{what}: connection failed ({type(exc).__name__})") from exc
    except Exception as exc:
        raise TransportError(f"{what}: malformed answer ({type(exc).__name__})") from exc


async def send_for_headers(
    http: httpx.AsyncClient, request: httpx.Request, *, limits: AnswerLimits, what: str
) -> httpx.Response:
    """:func:`send_streaming` for the media host: its headers within ``answer_seconds``.

    The body that follows is bounded by the size and low-speed limits instead.

    Raises:
        TransportError: As :func:`send_streaming`, or no headers within the deadline.
    """
    try:
        async with asyncio.timeout(limits.answer_seconds):
            return await send_streaming(http, request, what)
    except TimeoutError as exc:
        raise TransportError(
            f"{what}: no answer headers within {limits.answer_seconds:.0f}s"
        ) from exc


async def _read_limited(response: httpx.Response, limits: AnswerLimits, what: str) -> bytes:
    """The answer's body: at most ``metadata_max_bytes`` on the wire and once decoded.

    Read raw (httpx's decoding inflates before any limit applies) and decoded here by
    :func:`~recarchive.bird.limits.decode_body`; a body slower than the low-speed limit is
    aborted like a media download.
    """
    limit = limits.metadata_max_bytes
    refused = PayloadError(
        f"{what}: answer larger than {limit} bytes ({limits.body_limit_name}); refused unparsed",
        field="<body>",
    )
    announced = response.headers.get("Content-Length", "")
    if announced.isdigit() and int(announced) > limit:
        raise refused
    watch = LowSpeedWatch(limits.low_speed_bytes, limits.low_speed_seconds, what)
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
        b"".join(pieces),
        response.headers.get("Content-Encoding"),
        limit=limit,
        what=what,
        limit_name=limits.body_limit_name,
    )


async def _raw_pieces(response: httpx.Response) -> AsyncIterator[bytes]:
    """The body as sent (no decoding); a response a transport pre-read is yielded whole."""
    if response.is_stream_consumed:  # e.g. httpx.MockTransport with content=...
        yield response.content
        return
    async for piece in response.aiter_raw():
        yield piece


def classify(response: httpx.Response, what: str) -> RecarchiveError | None:
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
