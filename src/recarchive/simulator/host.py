"""What the simulator's two hosts share: the state they answer from, and deliberate drops.

Both hosts answer from the one dataset under the one fault profile, and count a fault key's
attempts in one counter, so the API host and the media host see the same faults. Both drop
connections on purpose (reset and truncate faults); the server's request log records a drop as
status 0, and the exception carries the drop from the handler to the log without aiohttp
answering.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from aiohttp import web

from recarchive.simulator.dataset import Dataset
from recarchive.simulator.faults import FaultProfile

if TYPE_CHECKING:  # a type only: server.py imports this module
    from recarchive.simulator.server import SimulatorConfig


@dataclass(frozen=True)
class HostState:
    """The state both hosts answer from.

    Attributes:
        config: The simulator's settings.
        dataset: The recordings served.
        faults: The fault profile.
        attempt: Counts a fault key's requests: returns how many came before this one.
    """

    config: SimulatorConfig
    dataset: Dataset
    faults: FaultProfile
    attempt: Callable[[str], int]


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
