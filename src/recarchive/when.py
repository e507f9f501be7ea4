"""Parsing the dates and timestamps users give (``--since``, ``--until``, flow parameters)."""

from __future__ import annotations

from datetime import UTC, date, datetime, time

from recarchive.errors import InputError


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


def plain_utc(moment: datetime) -> datetime:
    """``moment`` (aware) as a plain :class:`datetime` in UTC.

    Not a subclass such as Prefect's, so values compare and store alike whatever type or
    zone came in; built field by field, as a float timestamp could round microseconds.
    """
    moment = moment.astimezone(UTC)
    return datetime(
        moment.year,
        moment.month,
        moment.day,
        moment.hour,
        moment.minute,
        moment.second,
        moment.microsecond,
        tzinfo=UTC,
    )
