"""Request pacing shared by every concurrent request of a process.

A :class:`RequestPacer` hands out send slots at most ``rate`` per second. A 429's
``Retry-After`` pauses the pacer itself, so every sender waits, not only the one that was
told to. Since a 429 also means the configured rate is above what the API grants, the pacer
then halves its working rate and earns it back slowly with each success (AIMD, as TCP does),
so it settles just under the API's real limit instead of bursting into it after every pause.
The pacer is thread-safe and loop-agnostic (a lock guards the slot arithmetic; the
waiting is ``asyncio.sleep`` in the caller's loop), so one pacer can serve Prefect tasks that
run in different threads.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable


class RequestPacer:
    """At most ``rate`` request starts per second, process-wide.

    Args:
        rate: Requests per second.
        burst: Slots that may be handed out at once after an idle period.
        clock: Monotonic clock (tests).
    """

    def __init__(
        self, rate: float, *, burst: int = 1, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.current_rate = rate
        # A floor, so that a run of unrelated 429s cannot slow the pacer to a crawl: each
        # pause still holds every sender for the Retry-After the API asked for.
        self.min_rate = rate / 10
        self.interval = 1.0 / rate
        self.burst = max(1, burst)
        self._clock = clock
        self._lock = threading.Lock()
        self._next_slot = 0.0
        self._paused_until = 0.0
        self.pauses = 0

    def reserve(self) -> float:
        """Reserve the next send slot; return the seconds to wait before sending."""
        with self._lock:
            now = self._clock()
            # After idle time, allow a small burst rather than none at all.
            earliest = max(now - (self.burst - 1) * self.interval, self._paused_until)
            slot = max(self._next_slot, earliest)
            self._next_slot = slot + self.interval
            return max(0.0, slot - now)

    async def wait(self) -> None:
        """Wait for this request's slot.

        A pause that starts while we wait moves us behind it: the slot is reserved again, so
        requests queued before a 429 do not go out during the pause it asked for.
        """
        while True:
            pauses = self.pauses
            delay = self.reserve()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.pauses == pauses:
                return

    def record_success(self) -> None:
        """Note an accepted request: the working rate creeps back toward ``rate``."""
        if self.current_rate < self.rate:
            with self._lock:
                self.current_rate = min(self.rate, self.current_rate * 1.02)
                self.interval = 1.0 / self.current_rate

    def pause(self, seconds: float) -> None:
        """Hold every sender for ``seconds`` (a 429 with ``Retry-After``)."""
        if seconds <= 0:
            return
        with self._lock:
            now = self._clock()
            until = now + seconds
            if now >= self._paused_until:
                # One slow-down per pause: the other 429s of the same burst say nothing new.
                self.current_rate = max(self.min_rate, self.current_rate / 2)
                self.interval = 1.0 / self.current_rate
            if until > self._paused_until:
                self._paused_until = until
                self.pauses += 1
            # Slots already handed out keep their place; new ones start after the pause.
            self._next_slot = max(self._next_slot, until)
