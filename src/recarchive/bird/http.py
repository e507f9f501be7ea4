"""The HTTP client the Bird API client runs on.

httpx's default transport tops out around 500 requests/s under concurrency (DESIGN §5); the
same :class:`httpx.AsyncClient` on aiohttp's transport does about four times that, so the
API's rate limit rather than the client is the ceiling. Streaming and our manual redirect
handling work the same on both (the transport never follows redirects itself).
"""

from __future__ import annotations

import httpx
from httpx_aiohttp import AiohttpTransport


def build_http_client(
    *, timeout_seconds: float = 30.0, max_connections: int = 32, aiohttp: bool = True
) -> httpx.AsyncClient:
    """Build the :class:`httpx.AsyncClient` for the Bird API and its media host.

    The client carries no credentials: :class:`~recarchive.bird.client.BirdClient` adds the
    ``Authorization`` header to API requests only, so the media host never sees it.

    Args:
        timeout_seconds: Connect, read and pool timeout of each request.
        max_connections: Connection pool size; keep it above the pipeline's concurrency.
        aiohttp: Use the aiohttp transport (default); ``False`` uses httpx's own.

    Returns:
        A client the caller must close (``await client.aclose()``). It must be used from the
        event loop it first ran on.
    """
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    timeout = httpx.Timeout(timeout_seconds)
    transport = (
        AiohttpTransport(limits=limits) if aiohttp else httpx.AsyncHTTPTransport(limits=limits)
    )
    return httpx.AsyncClient(
        transport=transport, timeout=timeout, follow_redirects=False, trust_env=False
    )
