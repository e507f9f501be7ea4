"""The nightly run's windows: the pure catch-up arithmetic, and the ``listed_windows`` store.

The arithmetic is tested without Prefect or a database (every input is a plain datetime);
the store functions run on SQLite and PostgreSQL (the ``engine`` fixture of
``tests/fixtures/postgres.py``, a fresh upgraded database of each backend).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select

from recarchive.errors import InputError
from recarchive.ids.window import (
    DEFAULT_MAX_CATCH_UP_DAYS,
    NightlyPlan,
    Window,
    catch_up_window,
    nightly_window,
    plan_nightly,
    scheduled_time,
    utc_midnight,
)
from recarchive.store.archive import ArchiveStore
from recarchive.store.tables import listed_windows
from recarchive.store.windows import (
    ListedWindow,
    last_listed_end,
    record_listed_window,
    recorded_windows,
)

SIX_HOURS = timedelta(hours=6)
#: Wall clock of the pure tests: long after every night they plan.
NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)


def utc(day: int, hour: int = 0, minute: int = 0, *, month: int = 4) -> datetime:
    return datetime(2025, month, day, hour, minute, tzinfo=UTC)


def plan(last_end: datetime | None, scheduled: datetime, **options: object) -> NightlyPlan:
    return plan_nightly(last_end, scheduled, now=NOW, **options)  # type: ignore[arg-type]


# --- the window arithmetic ------------------------------------------------------------------


def test_no_recorded_window_gives_the_previous_day_plus_overlap() -> None:
    assert catch_up_window(None, utc(13), overlap=SIX_HOURS, max_days=7) == Window(
        utc(12) - SIX_HOURS, utc(13)
    )
    night = plan(None, utc(13, 2))
    assert night.window == Window(utc(11, 18), utc(13))
    assert night.record and night.remaining == timedelta(0)


def test_an_on_time_night_continues_the_last_window() -> None:
    night = plan(utc(12), utc(13, 2))
    assert night.window == Window(utc(11, 18), utc(13))
    assert night.record and night.behind_warning() is None


def test_two_missed_nights_are_covered_by_the_next_run() -> None:
    # Run of 04-10 listed 04-09; the worker was down for the runs of 04-11 and 04-12.
    night = plan(utc(10), utc(13, 2))
    assert night.window == Window(utc(10) - SIX_HOURS, utc(13))  # 04-10, 04-11 and 04-12
    assert night.record and night.behind_warning() is None


def test_a_failed_night_is_listed_again() -> None:
    # 04-11 failed (not recorded): the newest end is still 04-11 00:00.
    night = plan(utc(11), utc(12, 2))
    assert night.window == Window(utc(11) - SIX_HOURS, utc(12))
    # The same input gives the same window on retry: nothing depends on the failed run.
    assert plan(utc(11), utc(12, 2)) == night


@pytest.mark.parametrize(
    "started",
    [utc(13, 2), utc(13, 5, 30), utc(14, 0, 30), utc(15, 23, 59)],
    ids=["on-time", "05:30", "after-midnight", "two-days-late"],
)
def test_a_late_start_lists_the_scheduled_day(started: datetime) -> None:
    on_time = plan(utc(12), scheduled_time(utc(13, 2), started=utc(13, 2), now=utc(13, 2)))
    late = plan(utc(12), scheduled_time(utc(13, 2), started=started, now=started))
    assert late.window == on_time.window == Window(utc(11, 18), utc(13))


def test_the_old_wall_clock_window_shifts_after_midnight() -> None:
    """Why the scheduled time matters: the wall clock is only safe until midnight."""
    assert nightly_window(utc(13, 5, 30)) == nightly_window(utc(13, 2))
    assert nightly_window(utc(14, 0, 30)) != nightly_window(utc(13, 2))


def test_a_gap_over_max_catch_up_days_lists_the_oldest_days_first() -> None:
    night = plan(utc(1), utc(20, 2), max_catch_up_days=7)
    assert night.window == Window(utc(1) - SIX_HOURS, utc(8))
    assert night.record
    assert night.behind == timedelta(days=19)
    assert night.remaining == timedelta(days=12)
    warning = night.behind_warning()
    assert warning is not None
    assert "19 days behind" in warning and "12 days" in warning and "2025-04-08" in warning
    # The next night continues where this one stopped.
    assert plan(utc(8), utc(21, 2)).window == Window(utc(8) - SIX_HOURS, utc(15))
    assert plan(utc(15), utc(22, 2)).window == Window(utc(15) - SIX_HOURS, utc(22))


def test_a_gap_of_exactly_max_catch_up_days_is_caught_up_in_one_run() -> None:
    night = plan(utc(6), utc(13, 2), max_catch_up_days=7)
    assert night.window == Window(utc(6) - SIX_HOURS, utc(13))
    assert night.remaining == timedelta(0) and night.behind_warning() is None


def test_days_is_the_least_a_run_lists() -> None:
    # Not behind: ``days`` whole days plus the overlap, as before.
    assert plan(utc(12), utc(13, 2), days=3).window == Window(utc(10) - SIX_HOURS, utc(13))
    # Behind further than ``days``: from the last listed end.
    assert plan(utc(7), utc(13, 2), days=3).window == Window(utc(7) - SIX_HOURS, utc(13))


def test_overlap_hours_reaches_behind_the_last_listed_end() -> None:
    assert plan(utc(10), utc(13, 2), overlap_hours=0).window == Window(utc(10), utc(13))
    assert plan(utc(10), utc(13, 2), overlap_hours=30).window == Window(utc(8, 18), utc(13))


def test_a_night_already_listed_lists_its_usual_window_again() -> None:
    # A second run for the same scheduled day, or one behind a manual run: nothing is
    # skipped, and the usual window is cheap to list again.
    assert plan(utc(13), utc(13, 2)).window == Window(utc(11, 18), utc(13))
    assert plan(utc(20), utc(13, 2)).window == Window(utc(11, 18), utc(13))


def test_rerunning_a_past_day_lists_exactly_that_day() -> None:
    night = plan(utc(13), utc(14, 2), day=utc(5))
    assert night.window == nightly_window(utc(6)) == Window(utc(4, 18), utc(6))
    # Inside the listed coverage: recorded, and the newest end (04-13) stays the newest.
    assert night.record
    assert night.behind_warning() is None


def test_rerunning_a_day_beyond_a_gap_is_not_recorded() -> None:
    # Listed up to 04-01 only: recording 04-05 would hide 04-01..04-04 from the catch-up.
    night = plan(utc(1), utc(14, 2), day=utc(5))
    assert night.window == Window(utc(4, 18), utc(6))
    assert not night.record and "2025-04-01" in night.reason


def test_rerunning_a_day_on_an_empty_ledger_is_not_recorded() -> None:
    night = plan(None, utc(14, 2), day=utc(5))
    assert night.window == Window(utc(4, 18), utc(6)) and not night.record


def test_a_window_that_has_not_ended_yet_is_not_recorded() -> None:
    # ``day`` = today: recordings created after the listing would be missed.
    night = plan_nightly(utc(13), utc(13, 9), day=utc(13), now=utc(13, 9))
    assert night.window == Window(utc(12, 18), utc(14)) and not night.record


def test_a_window_is_recorded_only_if_it_joins_the_listed_coverage() -> None:
    assert plan(utc(6), utc(14, 2), day=utc(5), days=1, overlap_hours=0).record
    assert not plan(utc(4, 23), utc(14, 2), day=utc(5), days=1, overlap_hours=0).record


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"days": 0}, "days"),
        ({"overlap_hours": -1}, "overlap_hours"),
        ({"max_catch_up_days": 0}, "max_catch_up_days"),
        ({"days": 3, "max_catch_up_days": 2}, "max_catch_up_days"),
    ],
)
def test_bad_parameters_are_input_errors(options: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message):
        plan(utc(12), utc(13, 2), **options)


def test_scheduled_time_falls_back_to_the_start_then_the_clock() -> None:
    assert scheduled_time(utc(13, 2), started=utc(13, 5), now=utc(13, 6)) == utc(13, 2)
    assert scheduled_time(None, started=utc(13, 5), now=utc(13, 6)) == utc(13, 5)
    assert scheduled_time(None, started=None, now=utc(13, 6)) == utc(13, 6)
    # Any time zone in, UTC out (Prefect's own datetime class becomes a plain datetime).
    tokyo = timezone(timedelta(hours=9))
    moment = scheduled_time(datetime(2025, 4, 13, 8, tzinfo=tokyo))
    assert moment == utc(12, 23) and moment.tzinfo is UTC and type(moment) is datetime


def test_utc_midnight() -> None:
    assert utc_midnight(utc(13, 23, 59)) == utc(13)
    assert utc_midnight(datetime(2025, 4, 13, 1, tzinfo=timezone(timedelta(hours=2)))) == utc(12)


NIGHTS = 60
START = utc(1, month=3)


@settings(max_examples=200, deadline=None)
@given(
    outcomes=st.lists(
        st.sampled_from(["ok", "ok", "ok", "down", "failed"]), min_size=NIGHTS, max_size=NIGHTS
    ),
    late_hours=st.lists(st.floats(0, 40), min_size=NIGHTS, max_size=NIGHTS),
    max_days=st.integers(1, 10),
)
def test_no_hour_is_stranded_whatever_nights_fail(
    outcomes: list[str], late_hours: list[float], max_days: int
) -> None:
    """Nights down, failed or late: every hour up to the last good night ends up listed."""
    recorded: list[Window] = []
    last_end: datetime | None = None
    for night, (outcome, late) in enumerate(zip(outcomes, late_hours, strict=True)):
        scheduled = START + timedelta(days=night, hours=2)
        if outcome == "down":
            continue
        started = scheduled + timedelta(hours=late)
        step = plan_nightly(
            last_end,
            scheduled_time(scheduled, started=started, now=started),
            max_catch_up_days=max_days,
            now=started,
        )
        assert step.window.until <= utc_midnight(scheduled)
        assert step.window.until - step.window.since <= timedelta(days=max_days) + SIX_HOURS
        if outcome == "ok":
            assert step.record
            recorded.append(step.window)
            last_end = max(last_end or step.window.until, step.window.until)
    if not recorded:
        return
    # The recorded windows form one unbroken span from the first window's start.
    recorded.sort(key=lambda window: window.since)
    covered_until = recorded[0].until
    for window in recorded[1:]:
        assert window.since <= covered_until, f"gap {covered_until} .. {window.since}"
        covered_until = max(covered_until, window.until)
    assert covered_until == last_end


# --- the listed_windows store ---------------------------------------------------------------


def test_an_empty_ledger_has_no_listed_end(engine: Engine) -> None:
    assert last_listed_end(engine) is None
    assert recorded_windows(engine) == []


def test_a_recorded_window_round_trips_in_utc(engine: Engine, store: ArchiveStore) -> None:
    run_id = store.start_run("nightly", {})
    listed_at = datetime(2025, 4, 13, 2, 3, 4, 567891, tzinfo=UTC)
    row = record_listed_window(
        engine, Window(utc(11, 18), utc(13)), run_id=run_id, recordings=42, listed_at=listed_at
    )
    assert row == ListedWindow(utc(11, 18), utc(13), listed_at, run_id, 42)
    assert recorded_windows(engine) == [row]
    end = last_listed_end(engine)
    assert end == utc(13) and end is not None and end.tzinfo is UTC


def test_the_newest_end_wins_whatever_the_order(engine: Engine) -> None:
    for since, until in [(utc(9, 18), utc(11)), (utc(12, 18), utc(14)), (utc(4, 18), utc(6))]:
        record_listed_window(engine, Window(since, until), run_id=None, recordings=0)
    assert last_listed_end(engine) == utc(14)
    assert [window.since for window in recorded_windows(engine)] == [
        utc(4, 18),
        utc(9, 18),
        utc(12, 18),
    ]


def test_other_time_zones_are_stored_as_utc(engine: Engine) -> None:
    plus_two = timezone(timedelta(hours=2))
    window = Window(
        datetime(2025, 4, 12, 20, tzinfo=plus_two), datetime(2025, 4, 13, 2, tzinfo=plus_two)
    )
    record_listed_window(engine, window, run_id=None, recordings=1)
    assert last_listed_end(engine) == utc(13)
    # The same instants in UTC are the same primary key.
    record_listed_window(engine, Window(utc(12, 18), utc(13)), run_id=7, recordings=2)
    assert [(w.since, w.until, w.run_id) for w in recorded_windows(engine)] == [
        (utc(12, 18), utc(13), 7)
    ]


def test_recording_a_window_again_updates_its_row(engine: Engine) -> None:
    window = Window(utc(11, 18), utc(13))
    record_listed_window(engine, window, run_id=1, recordings=10, listed_at=utc(13, 2))
    again = record_listed_window(engine, window, run_id=2, recordings=12, listed_at=utc(14, 2))
    assert recorded_windows(engine) == [again]
    assert (again.run_id, again.recordings, again.listed_at) == (2, 12, utc(14, 2))
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(listed_windows)).scalar() == 1


def test_listed_at_defaults_to_now(engine: Engine) -> None:
    before = datetime.now(UTC)
    row = record_listed_window(engine, Window(utc(11, 18), utc(13)), run_id=None, recordings=0)
    assert before <= row.listed_at <= datetime.now(UTC)
    assert recorded_windows(engine)[0].listed_at == row.listed_at


@pytest.mark.parametrize(
    ("since", "until", "message"),
    [
        (utc(13), utc(13), "empty"),
        (utc(14), utc(13), "empty"),
        (datetime(2025, 4, 12), utc(13), "time zone"),
        (utc(12), datetime(2025, 4, 13), "time zone"),
    ],
)
def test_bad_windows_are_refused(
    engine: Engine, since: datetime, until: datetime, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        record_listed_window(engine, Window(since, until), run_id=None, recordings=0)
    assert recorded_windows(engine) == []


def test_recorded_windows_limit_gives_the_newest(engine: Engine) -> None:
    for day in range(1, 11):
        record_listed_window(
            engine, Window(utc(day) - SIX_HOURS, utc(day + 1)), run_id=None, recordings=day
        )
    newest = recorded_windows(engine, limit=3)
    assert [window.until for window in newest] == [utc(9), utc(10), utc(11)]


def test_default_max_catch_up_days() -> None:
    assert DEFAULT_MAX_CATCH_UP_DAYS == 7
