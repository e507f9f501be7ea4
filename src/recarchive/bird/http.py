"""The HTTP client the Bird API client runs on.

httpx's default transport tops out around 500 requests/s under concurrency (docs/benchmarks.md); the
same :class:`httpx.AsyncClient` on aiohttp's transport does about four times that, so the
API's rate limit rather than the client is the ceiling. Streaming and our manual redirect
handling work the same on both (the transport never follows redirects itself).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from recarchive.bird.redirect import GuardedResolver


class RedactQueryStrings(logging.Filter):
    """Drop query strings from the URLs httpx logs.

    httpx logs every request's full URL at INFO; a presigned media URL's query string is a
    credential. The CLI keeps httpx at WARNING anyway, but a worker or a caller configuring
    logging its own way must not be one log level away from leaking signatures.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's URL arguments without query; never drops a record."""
        if isinstance(record.args, tuple):
            record.args = tuple(
                arg.copy_with(query=None, fragment=None) if isinstance(arg, httpx.URL) else arg
                for arg in record.args
            )
        return True


_REDACTION = RedactQueryStrings()


def _aiohttp_transport(
    limits: httpx.Limits, connect_check: Callable[[str, list[str]], None] | None
) -> AiohttpTransport:
    transport = AiohttpTransport(limits=limits)

    def session() -> aiohttp.ClientSession:
        # What AiohttpTransport builds itself (same TLS context and pool), plus the resolver
        # and no cookie jar: Bird authenticates by a header, and a cookie one host set must
        # never travel to another (the media host).
        connector = aiohttp.TCPConnector(
            limit=limits.max_connections or 0,
            keepalive_timeout=limits.keepalive_expiry,
            ssl=transport.ssl_context,
            resolver=GuardedResolver(connect_check) if connect_check is not None else None,
        )
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    transport.client = session
    return transport


def build_http_client(
    *,
    timeout_seconds: float = 30.0,
    max_connections: int = 32,
    aiohttp: bool = True,
    connect_check: Callable[[str, list[str]], None] | None = None,
) -> httpx.AsyncClient:
    """Build the :class:`httpx.AsyncClient` for the Bird API and its media host.

    The client carries no credentials: :class:`~recarchive.bird.client.BirdClient` adds the
    ``Authorization`` header to API requests only, so the media host never sees it.

    Args:
        timeout_seconds: Connect, read and pool timeout of each request.
        max_connections: Connection pool size; keep it above the pipeline's concurrency.
        aiohttp: Use the aiohttp transport (default); ``False`` uses httpx's own.
        connect_check: Applied to every resolved name before connecting (aiohttp transport
            only): :meth:`recarchive.bird.redirect.RedirectPolicy.check_connect`.

    Returns:
        A client the caller must close (``await client.aclose()``). It must be used from the
        event loop it first ran on.
    """
    httpx_logger = logging.getLogger("httpx")
    if _REDACTION not in httpx_logger.filters:
        httpx_logger.addFilter(_REDACTION)
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    timeout = httpx.Timeout(timeout_seconds)
    transport: httpx.AsyncBaseTransport
    if aiohttp:
        transport = _aiohttp_transport(limits, connect_check)
    else:
        transport = httpx.AsyncHTTPTransport(limits=limits)
    return httpx.AsyncClient(
        transport=transport, timeout=timeout, follow_redirects=False, trust_env=False
    )
