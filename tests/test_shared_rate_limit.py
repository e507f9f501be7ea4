"""One API rate limit for every process on one ledger database (store/permits, bird/ratelimit).

The schedule is checked on both backends, then for real: several processes pace themselves
through one database, and the moments they send, merged, never exceed the rate by more than
one batch in any one-second window.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine

from recarchive.bird.ratelimit import RequestPacer, SharedPermits
from recarchive.errors import StorageUnavailableError
from recarchive.store.engine import create_engine_for, upgrade_database
from recarchive.store.permits import RequestPermits

ROOT = Path(__file__).resolve().parent.parent


def test_takes_get_consecutive_slots_of_the_shared_schedule(engine: Engine) -> None:
    permits = RequestPermits(engine, "bird-api test", rate=10.0)
    other = RequestPermits(engine, "bird-api test", rate=10.0)
    waits = [permits.take(5), other.take(5), permits.take(2)]
    # Slots of 0.5 s, 0.5 s and 0.2 s, back to back from the first take.
    assert waits[0] == pytest.approx(0.0, abs=0.05)
    assert waits[1] == pytest.approx(0.5, abs=0.05)
    assert waits[2] == pytest.approx(1.0, abs=0.05)


def test_limits_of_other_names_do_not_share_a_schedule(engine: Engine) -> None:
    first = RequestPermits(engine, "bird-api a", rate=1.0)
    second = RequestPermits(engine, "bird-api b", rate=1.0)
    assert first.take(10) == pytest.approx(0.0, abs=0.05)
    assert second.take(10) == pytest.approx(0.0, abs=0.05)
    assert first.take(1) == pytest.approx(10.0, abs=0.1)


def test_an_idle_limit_does_not_bank_permits(engine: Engine) -> None:
    # A slot is taken from max(next_free, now): idle time is not saved up for a later burst.
    permits = RequestPermits(engine, "bird-api idle", rate=20.0)
    permits.take(1)
    time.sleep(0.3)
    assert permits.take(4) == pytest.approx(0.0, abs=0.05)
    assert permits.take(1) == pytest.approx(0.2, abs=0.05)


@pytest.mark.parametrize("count", [0, -1], ids=["zero", "negative"])
def test_a_take_of_no_permits_is_refused(engine: Engine, count: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        RequestPermits(engine, "bird-api x", rate=1.0).take(count)


def test_an_unreachable_database_stops_the_run_without_its_url(tmp_path: Path) -> None:
    engine = create_engine_for("postgresql+psycopg://user:hunter2@127.0.0.1:1/none")
    try:
        with pytest.raises(StorageUnavailableError) as caught:
            RequestPermits(engine, "bird-api x", rate=1.0).take(1)
    finally:
        engine.dispose()
    assert "hunter2" not in str(caught.value) and "127.0.0.1" not in str(caught.value)


class _Schedule:
    """A permit source in memory: the same arithmetic as the table, on a given clock."""

    def __init__(self, rate: float, clock: Callable[[], float]) -> None:
        self.rate, self.clock, self.next_free, self.takes = rate, clock, 0.0, 0

    def take(self, count: int) -> float:
        self.takes += 1
        now = self.clock()
        start = max(self.next_free, now)
        self.next_free = start + count / self.rate
        return start - now


async def test_a_batch_not_used_in_time_is_dropped_not_spent_late() -> None:
    now = [100.0]
    schedule = _Schedule(rate=10.0, clock=lambda: now[0])
    shared = SharedPermits(schedule, batch=3, rate=10.0, clock=lambda: now[0])
    await shared.acquire()
    # Its slot is 0.3 s; a late sender may still use it for one more slot length.
    now[0] = 100.5
    await shared.acquire()
    assert schedule.takes == 1
    now[0] = 100.7  # this process stalled past that
    await shared.acquire()
    # The permit left of the first batch was dropped; a new batch was taken.
    assert shared.dropped == 1 and schedule.takes == 2


async def test_a_429_with_the_shared_limit_slows_the_senders_but_never_stops_them() -> None:
    # A pause halves the process's own rate: its senders then reach the shared limit more
    # slowly, and each permit must still be theirs to use when they get there.
    rate = 50.0
    schedule = _Schedule(rate=rate, clock=time.monotonic)
    pacer = RequestPacer(rate, shared=SharedPermits(schedule, batch=5, rate=rate))
    sends: list[float] = []
    start = time.monotonic()

    async def sender() -> None:
        while time.monotonic() - start < 3.0:
            await pacer.wait()
            sends.append(time.monotonic() - start)
            pacer.record_success()

    async def a_429() -> None:
        await asyncio.sleep(0.5)
        pacer.pause(0.5)

    # Bounded: senders that stop for good (the bug this guards against) fail in seconds.
    await asyncio.wait_for(asyncio.gather(a_429(), *(sender() for _ in range(16))), 10)
    after = [moment for moment in sends if moment >= 1.5]
    # Half the rate and creeping back: about 40 sends in the last 1.5 s; none would be a hang.
    assert len(after) >= 20, (len(after), len(sends))
    assert not [moment for moment in sends if 0.55 <= moment < 0.95]  # the pause held


async def test_the_pacer_takes_one_batch_per_batch_of_requests() -> None:
    schedule = _Schedule(rate=100.0, clock=time.monotonic)
    pacer = RequestPacer(100.0, shared=SharedPermits(schedule, batch=4, rate=100.0))
    for _ in range(12):
        await pacer.wait()
    assert schedule.takes == 3


def _send_moments(url: str, tmp_path: Path, *, rate: float, batch: int) -> list[float]:
    """Run three pacing processes from one start moment; return all their send moments."""
    processes, sends = 3, 40
    start_at = time.time() + 2.0  # every process starts pacing at the same moment
    outputs = [tmp_path / f"sends-{index}.json" for index in range(processes)]
    arguments = (rate, batch, sends, start_at)
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.fixtures.pacing", url, *map(str, arguments), output],
            cwd=ROOT,
        )
        for output in outputs
    ]
    for child in children:
        assert child.wait(timeout=60) == 0
    moments = sorted(moment for output in outputs for moment in json.loads(output.read_text()))
    assert len(moments) == processes * sends
    return moments


def _peak(moments: list[float]) -> int:
    """The most moments in any one-second window (every window that starts at a moment)."""
    return max(
        sum(1 for later in moments[index:] if later < moment + 1.0)
        for index, moment in enumerate(moments)
    )


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_processes_sharing_one_database_stay_within_one_batch_of_the_rate(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    with contextlib.ExitStack() as stack:
        if backend == "sqlite":
            url = f"sqlite:///{tmp_path / 'permits.db'}"
        else:
            from tests.fixtures.postgres import fresh_postgres_database

            server = request.getfixturevalue("postgres_url")
            url = stack.enter_context(fresh_postgres_database(server))
        engine = create_engine_for(url)
        try:
            upgrade_database(engine)
        finally:
            engine.dispose()
        rate, batch = 40.0, 4
        moments = _send_moments(url, tmp_path, rate=rate, batch=batch)
    peak, elapsed = _peak(moments), moments[-1] - moments[0]
    print(f"{backend}: peak {peak} sends in one second, {len(moments) / elapsed:.1f}/s overall")
    assert peak <= rate + batch
    # Without the shared limit the three processes send 3 x 40 per second (the control
    # below); with it, 120 sends take about three seconds.
    assert elapsed >= (len(moments) - rate - batch) / rate


def test_without_the_shared_limit_the_processes_add_up(tmp_path: Path) -> None:
    # The control: the same three processes, each pacing only itself.
    rate = 40.0
    assert _peak(_send_moments("none", tmp_path, rate=rate, batch=0)) > 2 * rate
