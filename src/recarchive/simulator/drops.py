"""Deliberate connection drops: how the reset and truncate faults end a request.

Both hosts drop connections on purpose, and the server's request log records a drop as status
0; the exception carries the drop from the handler to the log without aiohttp answering.
"""

from __future__ import annotations

import logging
from typing import NoReturn

from aiohttp import web


class DroppedConnection(Exception):
    """Raised by a handler that closed the connection on purpose (reset fault)."""


def drop(request: web.Request) -> NoReturn:
    """Close the connection without a (complete) response.

    Raises:
        DroppedConnection: Always, so the handler ends here and the drop is logged.
    """
    transport = request.transport
    if transport is not None:
        transport.abort()
    raise DroppedConnection


class HideDroppedConnections(logging.Filter):
    """Keep aiohttp from logging our deliberate connection drops as server errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Let a record through unless its exception is a :class:`DroppedConnection`."""
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, DroppedConnection)
