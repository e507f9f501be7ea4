"""What the simulator's two hosts share: the state they answer from, and deliberate drops.

Both hosts answer from the one dataset under the one fault profile, and count a fault key's
attempts in one counter, so the API host and the media host see the same faults. Both drop
connections on purpose (reset and truncate faults); the server's request log records a drop as
status 0, and the exception carries the drop from the handler to the log without aiohttp
answering. Both count what they answered in one :class:`RequestStats` (``GET /_sim/stats``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from aiohttp import web

from recarchive.simulator.dataset import RecordingSet
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
        stats: The request counts both hosts keep.
    """

    config: SimulatorConfig
    dataset: RecordingSet
    faults: FaultProfile
    attempt: Callable[[str], int]
    stats: RequestStats


class RequestStats:
    """What the two hosts answered, counted as it happens (``GET /_sim/stats``).

    Unlike the server's request log, these are counters: they stay small over a run of a
    million requests, and the peak rate is known without replaying the log. API requests count
    when they arrive (before any ``latency_seconds``), so the peak is the rate clients sent
    at, whatever the answer; the simulator's own ``/_sim/`` endpoints never count.
    """

    def __init__(self) -> None:
        # Updated on the server's event loop, read from any thread (tests call snapshot()).
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget every count; the per-second counts start from now."""
        with self._lock:
            self._started = time.monotonic()
            self._api_status: Counter[int] = Counter()
            self._api_seconds: Counter[int] = Counter()
            self._api_window: deque[float] = deque()
            self._api_peak = 0
            self._media_status: Counter[int] = Counter()
            self._downloads: Counter[str] = Counter()

    def api_arrived(self, at: float) -> None:
        """Count an API request that arrived at ``time.monotonic()`` ``at``."""
        with self._lock:
            self._api_seconds[int(at - self._started)] += 1
            window = self._api_window
            window.append(at)
            while window[0] <= at - 1.0:
                window.popleft()
            self._api_peak = max(self._api_peak, len(window))

    def answered(self, server: str, status: int) -> None:
        """Count the status a request was answered with (0: connection dropped on purpose)."""
        with self._lock:
            (self._api_status if server == "api" else self._media_status)[status] += 1

    def downloaded(self, recording_id: str) -> None:
        """Count a media body sent whole (not a range GET, not a truncated one)."""
        with self._lock:
            self._downloads[recording_id] += 1

    def snapshot(self) -> dict[str, Any]:
        """The counts as the JSON document of ``GET /_sim/stats`` (fields: the README)."""
        with self._lock:
            return {
                "uptime_seconds": round(time.monotonic() - self._started, 3),
                "api": {
                    "requests": sum(self._api_status.values()),
                    "by_status": _by_status(self._api_status),
                    "rate_limited": self._api_status[429],
                    "peak_per_second": self._api_peak,
                    "per_second": {str(s): n for s, n in sorted(self._api_seconds.items())},
                },
                "media": {
                    "requests": sum(self._media_status.values()),
                    "by_status": _by_status(self._media_status),
                    "downloads": sum(self._downloads.values()),
                    "distinct_downloads": len(self._downloads),
                    "repeated_downloads": {r: n for r, n in self._downloads.items() if n > 1},
                },
            }


def _by_status(counts: Counter[int]) -> dict[str, int]:
    return {str(status): n for status, n in sorted(counts.items())}


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
    """Keep aiohttp from logging dropped connections as server errors.

    Ours (a fault's deliberate drop) and the client's: a run that stops (a full disk, Ctrl-C)
    closes its connections mid-answer, and aiohttp then logs "Error handling request" with
    the reset's traceback, which lands in the output of the CLI that stopped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Let a record through unless its exception is a dropped connection."""
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, (DroppedConnection, ConnectionResetError, BrokenPipeError))
