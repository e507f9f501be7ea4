"""When and how long to retry one HTTP request (the only retry layer for Bird requests)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, capped in attempts and in total time.

    Attributes:
        max_attempts: Attempts per request, the first included.
        max_total_seconds: No retry starts once this much time went by since the first attempt.
        base_delay: Backoff of the first retry (before jitter).
        max_delay: Largest single backoff.
        max_retry_after: Largest ``Retry-After`` honoured; longer asks count as this.
    """

    max_attempts: int = 6
    max_total_seconds: float = 300.0
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_retry_after: float = 120.0
    _random: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1 = the first)."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return self._random.uniform(0, ceiling)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before the next attempt: the server's ``Retry-After`` when it gave one."""
        if retry_after is not None and retry_after > 0:
            return min(retry_after, self.max_retry_after)
        return self.backoff(attempt)

    def may_retry(self, attempt: int, elapsed: float, delay: float) -> bool:
        """True when attempt ``attempt`` failed and another one fits the caps."""
        return attempt < self.max_attempts and elapsed + delay <= self.max_total_seconds


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Parse a ``Retry-After`` header: delta seconds or an HTTP date.

    Returns:
        Seconds to wait, ``None`` when the header is missing, zero or unparseable (the caller
        then uses its own backoff).
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return seconds if seconds > 0 else None
