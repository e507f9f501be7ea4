"""Request pacing shared by every concurrent request of a process.

A :class:`RequestPacer` hands out send slots at most ``rate`` per second. A 429's
``Retry-After`` pauses the pacer itself, so every sender waits, not only the one that was
told to. Since a 429 also means the configured rate is above what the API grants, the pacer
then halves its working rate and earns it back slowly with each success (AIMD, as TCP does),
so it settles just under the API's real limit instead of bursting into it after every pause.
The pacer is thread-safe and loop-agnostic (a lock guards the slot arithmetic; the
waiting is ``asyncio.sleep`` in the caller's loop), so one pacer can serve Prefect tasks that
run in different threads.

One pacer paces one process. When several processes share the API's limit (the child runs of
a fan-out backfill on several workers), each pacer also draws :class:`SharedPermits` from a
:class:`PermitSource` that all of them share (``recarchive.store.permits`` keeps one in the
ledger database), a batch at a time, so the source is asked once per many requests.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol


class PermitSource(Protocol):
    """A rate limit shared with other processes."""

    def take(self, count: int) -> float:
        """Reserve ``count`` permits; return the seconds to wait before using the first.

        Blocking (it may ask a database): called in a worker thread.
        """
        ...


class SharedPermits:
    """This process's share of a :class:`PermitSource`, taken ``batch`` permits at a time.

    A take reserves a slot of ``batch / rate`` seconds in the shared schedule; slots of
    different takers never overlap. Within its slot a batch's permits are handed out at most
    ``rate`` per second, each just before its request goes out (after the process's own
    pacing), so all processes together send at ``rate``. A permit may be handed out until one
    slot length after its slot (a sender the event loop kept a little late); a batch not used
    up by then is dropped, never spent on top of later slots. So a one-second window holds at
    most one batch more than ``rate``.

    Takes run in a thread of their own (they may wait for the database), never queued behind
    the other work of the event loop's default executor.

    Bound to the event loop of its first :meth:`acquire` (as the HTTP client that uses it is).

    Args:
        source: The shared limit.
        batch: Permits per take: how many requests share one take's cost.
        rate: The shared limit's rate (permits per second).
        clock: Monotonic clock (tests).
    """

    def __init__(
        self,
        source: PermitSource,
        *,
        batch: int,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.source = source
        self.batch = batch
        self.rate = rate
        self.takes = 0
        self.dropped = 0
        self._clock = clock
        self._left = 0
        self._next_at = 0.0
        self._use_by = 0.0
        self._lock: asyncio.Lock | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def acquire(self) -> None:
        """Wait until one shared permit is this process's to use now."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        # Held while waiting for a slot: no sender of this process may go before it.
        async with self._lock:
            if self._left and self._clock() >= self._use_by:
                self.dropped += self._left
                self._left = 0
            if self._left == 0:
                await self._take()
            wait = self._next_at - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
            self._next_at += 1 / self.rate
            self._left -= 1

    async def _take(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="recarchive-permits")
        # The clock before the take: an answer that reaches the loop late must not move the
        # slot later than the schedule put it.
        asked_at = self._clock()
        loop = asyncio.get_running_loop()
        delay = await loop.run_in_executor(self._executor, self.source.take, self.batch)
        self.takes += 1
        self._left = self.batch
        self._next_at = asked_at + delay
        self._use_by = self._next_at + 2 * self.batch / self.rate


class RequestPacer:
    """At most ``rate`` request starts per second, process-wide.

    Args:
        rate: Requests per second.
        burst: Slots that may be handed out at once after an idle period.
        clock: Monotonic clock (tests).
        shared: Permits of a limit shared with other processes, drawn on top of this
            process's own pacing; ``None`` when this process has the API to itself.
    """

    def __init__(
        self,
        rate: float,
        *,
        burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedPermits | None = None,
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
        self.shared = shared

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
            # This process's own spacing first, then the shared permit, used at once: a permit
            # never waits behind a slow local slot (after a 429 halves the local rate) until
            # it expires.
            if self.shared is not None:
                await self.shared.acquire()
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
