"""Parsing the dates and timestamps users give (``--since``, ``--until``, flow parameters)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from recarchive.errors import InputError
from recarchive.model import plain_utc


def parse_when(value: str, option: str) -> datetime:
    """Parse a date (``2026-01-31``: midnight UTC) or an ISO timestamp (UTC when naive).

    Args:
        value: The text given.
        option: The option or parameter name, for the error message.

    Returns:
        An aware UTC datetime.

    Raises:
        InputError: Naming the option and the value.
    """
    text = value.strip()
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), time(0), tzinfo=UTC)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InputError(
            f"{option}: {value!r} is not a date (YYYY-MM-DD) or ISO timestamp"
        ) from exc
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


@dataclass(frozen=True)
class Window:
    """A half-open creation-time window ``[since, until)`` in UTC."""

    since: datetime
    until: datetime

    def as_params(self) -> dict[str, str]:
        """ISO strings for run parameters and the ``runs`` row."""
        return {"since": self.since.isoformat(), "until": self.until.isoformat()}


#: How many days past the end of the last listed window one nightly run lists at most.
DEFAULT_MAX_CATCH_UP_DAYS = 7

_DAY = timedelta(days=1)


def nightly_window(
    now: datetime | None = None, *, days: int = 1, overlap_hours: float = 6.0
) -> Window:
    """The window of a nightly run: the previous ``days`` UTC days, widened backwards.

    The overlap re-lists the end of the day before, so a recording that became visible late
    is not missed; re-listing costs one list request per page, and already-archived
    recordings cost no further request. Nights that were missed or failed are not this
    function's business: :func:`plan_nightly` reaches back to the last listed window.
    """
    today = utc_midnight(now or datetime.now(UTC))
    return Window(today - timedelta(days=days) - timedelta(hours=overlap_hours), today)


def utc_midnight(moment: datetime) -> datetime:
    """00:00 UTC of the UTC day that ``moment`` (aware) falls in."""
    return moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def scheduled_time(
    scheduled: datetime | None,
    *,
    started: datetime | None = None,
    now: datetime | None = None,
) -> datetime:
    """The moment a nightly run is for: its scheduled time, else its start, else now.

    A scheduled flow run's expected start time is its schedule slot and stays so however
    late a worker picks it up. Prefect gives an ad-hoc run (``prefect deployment run``, or
    the flow called directly) the time it was created instead, which is about its start;
    ``None`` is possible by the API's types only, and falls back to the start, then the clock.

    Returns:
        A plain ``datetime`` in UTC (Prefect's own datetime subclass is converted).
    """
    return plain_utc(scheduled or started or now or datetime.now(UTC))


def catch_up_window(
    last_end: datetime | None,
    scheduled_day: datetime,
    *,
    overlap: timedelta,
    max_days: int,
    days: int = 1,
) -> Window:
    """The window a nightly run lists: from the last listed end up to its scheduled day.

    The window ends at 00:00 UTC of ``scheduled_day`` and covers at least the ``days`` whole
    days before it, widened back by ``overlap``. When the last complete listing ended before
    those days (nights missed or failed), the window starts there instead, less ``overlap``;
    if that is more than ``max_days`` days back, only the oldest ``max_days`` days are
    listed, so the next run continues from their end and every run stays bounded.

    Args:
        last_end: End of the newest window listed completely, or ``None`` when none is
            recorded (the usual window then).
        scheduled_day: Any moment of the UTC day the run is scheduled for.
        overlap: How far to re-list before the start, for recordings that became visible
            late.
        max_days: Most days listed past ``last_end`` (at least 1).
        days: Least whole days listed before the scheduled day (at least 1).

    Returns:
        The half-open window to list.
    """
    until = utc_midnight(scheduled_day)
    usual_start = until - days * _DAY
    if last_end is None or last_end >= usual_start:
        return Window(usual_start - overlap, until)
    return Window(last_end - overlap, min(until, last_end + max_days * _DAY))


@dataclass(frozen=True)
class NightlyPlan:
    """What one nightly run lists, and whether its window may be recorded afterwards.

    Attributes:
        window: The window to list.
        record: Record the window in ``listed_windows`` once it is listed to the last page
            and ``archive_ids`` returned.
        target: The end the run wants listed by: 00:00 UTC of its scheduled day (a re-run of
            a given ``day``: its window's end).
        last_end: The newest listed end before the run, or ``None``.
        reason: One line saying why this window (and why it is not recorded, if not).
    """

    window: Window
    record: bool
    target: datetime
    last_end: datetime | None
    reason: str

    @property
    def behind(self) -> timedelta:
        """How far the listed coverage lags behind ``target`` before this run."""
        if self.last_end is None:
            return timedelta(0)
        return max(self.target - self.last_end, timedelta(0))

    @property
    def remaining(self) -> timedelta:
        """What is still to list up to ``target`` after this run (zero when caught up)."""
        return max(self.target - self.window.until, timedelta(0))

    def behind_warning(self) -> str | None:
        """The warning a run logs when it cannot catch up in one go, else ``None``."""
        if self.remaining <= timedelta(0) or self.last_end is None:
            return None
        return (
            f"the listing is {_days(self.behind)} behind: listed completely up to "
            f"{self.last_end:%Y-%m-%d %H:%M} UTC; this run lists the oldest part, up to "
            f"{self.window.until:%Y-%m-%d %H:%M} UTC, and leaves {_days(self.remaining)} "
            "to the next runs (raise max_catch_up_days to catch up faster)"
        )


def plan_nightly(
    last_end: datetime | None,
    scheduled: datetime,
    *,
    day: datetime | None = None,
    days: int = 1,
    overlap_hours: float = 6.0,
    max_catch_up_days: int = DEFAULT_MAX_CATCH_UP_DAYS,
    now: datetime | None = None,
) -> NightlyPlan:
    """Plan a nightly run from the ledger's last listed end and the run's scheduled time.

    Without ``day``, :func:`catch_up_window` of the scheduled day. With ``day`` (re-running
    a given night), exactly that night's usual window, as :func:`nightly_window` gives it.

    A window is recorded only when it ended by ``now`` (a window still open would miss
    recordings created after the listing) and when it starts at or before ``last_end``, so
    the recorded windows stay one unbroken span and their newest end says where listing
    must resume. A scheduled run's window always starts there; a re-run of a ``day`` beyond a
    gap does not, and recording it would hide the gap from the next runs. With nothing
    recorded yet, only a scheduled run's (usual) window starts the record.

    Args:
        last_end: :func:`recarchive.store.windows.last_listed_end`.
        scheduled: :func:`scheduled_time` of the run.
        day: The last UTC day to list (midnight UTC of it), or ``None`` for the scheduled day.
        days: Least whole UTC days listed, ending with the day before the scheduled day (or
            with ``day``).
        overlap_hours: How far every window reaches back beyond its start.
        max_catch_up_days: Most days a scheduled run lists past ``last_end``; at least
            ``days``, or a run that fell behind would list less than an ordinary one.
        now: The wall clock (for the "ended" check); now by default.

    Raises:
        InputError: ``days`` below 1, ``max_catch_up_days`` below ``days``, or a negative
            ``overlap_hours``.
    """
    if days < 1:
        raise InputError(f"days must be at least 1, not {days}")
    if overlap_hours < 0:
        raise InputError(f"overlap_hours must not be negative, not {overlap_hours:g}")
    if max_catch_up_days < days:
        raise InputError(
            f"max_catch_up_days must be at least days ({days}), not {max_catch_up_days}"
        )
    now = now or datetime.now(UTC)
    overlap = timedelta(hours=overlap_hours)
    if day is not None:
        window = nightly_window(day + _DAY, days=days, overlap_hours=overlap_hours)
        target = window.until
        joins = last_end is not None and window.since <= last_end
        reason = f"re-run of {utc_midnight(day):%Y-%m-%d}"
        if not joins:
            # Not an error: the listing and archive run as asked; only the record waits for
            # the scheduled runs, which list from the last listed end and cover this day too.
            if last_end is None:
                reason += "; not recorded: no window is recorded yet (scheduled runs start it)"
            else:
                reason += (
                    f"; not recorded: listed completely up to {last_end:%Y-%m-%d %H:%M} UTC, "
                    "before this window starts"
                )
    else:
        target = utc_midnight(scheduled)
        window = catch_up_window(
            last_end, scheduled, overlap=overlap, max_days=max_catch_up_days, days=days
        )
        joins = True
        if last_end is None:
            reason = "no window listed yet: the usual window"
        elif window.since + overlap < target - days * _DAY:
            reason = f"catching up from {last_end:%Y-%m-%d %H:%M} UTC"
        else:
            reason = "the usual window"
    record = joins and window.until <= now
    if joins and not record:
        reason += f"; not recorded: the window ends after now ({now:%Y-%m-%d %H:%M} UTC)"
    return NightlyPlan(window, record, target, last_end, reason)


def _days(span: timedelta) -> str:
    count = span / _DAY
    return f"{count:g} day" if count == 1 else f"{count:g} days"
