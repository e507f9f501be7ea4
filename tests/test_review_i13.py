"""Hostile review of issue 13's batching (ledger marks, small bodies in memory, export).

Each test pins one claim of the merged change: a defect found (it failed before its fix), or a
property that held under a scenario built to break it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from recarchive.media.spool import BodySpool, _Budget
from recarchive.normalize import normalize_recording
from recarchive.run.marks import MarkBatch
from recarchive.store.archive import ArchiveStore
from recarchive.store.outcomes import Outcome
from tests.test_normalize import make_payload
from tests.test_outcomes import WORK, stored


def _slowed(monkeypatch: pytest.MonkeyPatch, name: str) -> threading.Event:
    """Make ``tempfile.<name>`` wait 0.3 s in its thread; the event says it started."""
    real: Callable[..., Any] = getattr(tempfile, name)
    started = threading.Event()

    def slow(*args: Any, **kwargs: Any) -> Any:
        started.set()
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, name, slow)  # the module the spool calls
    return started


def _files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


async def test_a_transfer_cancelled_while_its_temp_file_is_made_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BodySpool.close promises the file never outlives the transfer, cancellation included.

    Before this release the temp file was made synchronously; the spool makes it in a thread,
    and a cancellation (a sibling's fatal error) during that call left the file behind in a
    live process, where the start-up sweep of dead processes' files never removes it.
    """
    started = _slowed(monkeypatch, "mkstemp")
    budget = _Budget(1024)
    spool = BodySpool(tmp_path, memory_limit=0, budget=budget)

    async def transfer() -> None:
        try:
            await spool.start(10_000)
            await spool.write(b"x" * 10_000)
        finally:
            await spool.close()

    task = asyncio.create_task(transfer())
    await asyncio.to_thread(started.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.6)  # the thread's mkstemp has finished by now
    assert _files(tmp_path) == []
    assert budget.used == 0


async def test_the_budget_comes_back_after_a_cancel_mid_body(tmp_path: Path) -> None:
    """A body cancelled in memory (its large chunk hashed in a thread) gives its bytes back."""
    budget = _Budget(8 * 1024 * 1024)
    spool = BodySpool(tmp_path, memory_limit=4 * 1024 * 1024, budget=budget)
    gate = asyncio.Event()

    async def transfer() -> None:
        try:
            await spool.start(3 * 1024 * 1024)
            await spool.write(b"\xff" * (1024 * 1024))
            gate.set()
            await spool.write(b"\xfb" * (1024 * 1024))
            await asyncio.sleep(10)
        finally:
            await spool.close()

    task = asyncio.create_task(transfer())
    await gate.wait()
    assert budget.used == 3 * 1024 * 1024
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert budget.used == 0
    assert _files(tmp_path) == []


async def test_a_recording_given_twice_counts_the_outcome_that_was_applied(
    store: ArchiveStore,
) -> None:
    """apply_outcomes applies the first of two outcomes of one recording and refuses the second.

    MarkBatch looks refusals up by recording ID, so it never puts two outcomes of one
    recording in one batch: the second one waits for the first one's batch. (Before, the
    applied outcome was routed to ``on_refused`` too: written to the ledger but never counted.)
    The pipeline ends each item once, so this is the batcher's API only.
    """
    (recording_id,) = stored(store, 1)
    applied: list[str] = []
    refused: list[int] = []
    async with MarkBatch(store, "a", lambda: refused.append(1), max_wait=60) as marks:
        await marks.add(
            Outcome.failed(recording_id, error="e", retry_at=None),
            lambda: applied.append("failed"),
        )
        await marks.add(
            Outcome.metadata_only(recording_id, reason="skip-media"),
            lambda: applied.append("metadata_only"),
        )
    assert store.get_entries([recording_id])[recording_id].state == "failed"
    assert (applied, refused) == (["failed"], [1])


RENEW_EVERY = 0.2


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_runs_batches_and_renewals_over_shared_months_never_fail(
    database_url: str, store: ArchiveStore
) -> None:
    """Two runs' batches and lease renewals at once on PostgreSQL, on rows of shared months.

    Each run's recordings spread over the same 40 months in another order, so two batches
    bump overlapping partition rows; renewals lock the rows the batches update. Every batch
    must apply whole (deadlocks retried), and every partition must count every change.
    """
    assert database_url.startswith("postgresql")
    months = [datetime(2000 + n // 12, n % 12 + 1, 5, tzinfo=UTC) for n in range(40)]
    records = [
        normalize_recording(
            make_payload(index, created=months[(index * 7) % 40]),
            workspace_id="ws",
            fetched_at=datetime.now(UTC),
        )
        for index in range(1200)
    ]
    store.save_metadata(records)
    ids = [record.id for record in records]
    store.register(ids)
    owned = {"a": ids[0::2], "b": ids[1::2]}
    errors: list[BaseException] = []
    stop = threading.Event()

    def worker(owner: str, rounds: int) -> None:
        rng = random.Random(owner)
        mine = owned[owner]
        try:
            for _ in range(rounds):
                # Rows the renewer holds locked right now are skipped (SKIP LOCKED): again.
                held: set[str] = set()
                while len(held) < len(mine):
                    held.update(store.claim(mine, owner=owner, lease_seconds=60, states=WORK))
                order = list(mine)
                rng.shuffle(order)
                for start in range(0, len(order), 64):
                    part = order[start : start + 64]
                    refused = store.apply_outcomes(
                        [Outcome.failed(i, error="e", retry_at=None) for i in part], owner=owner
                    )
                    assert refused == {}
        except BaseException as exc:  # reported by the assertion below
            traceback.print_exc()
            errors.append(exc)

    def renewer(owner: str) -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):  # the pipeline only logs these
                store.renew(owned[owner], owner=owner, lease_seconds=60)
            # Far more often than the pipeline's (a third of the lease, 100 s by default).
            stop.wait(RENEW_EVERY)

    threads = [threading.Thread(target=worker, args=(owner, 3)) for owner in owned]
    renewers = [threading.Thread(target=renewer, args=(owner,)) for owner in owned]
    for thread in threads + renewers:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    stop.set()
    for thread in renewers:
        thread.join(timeout=30)
    assert errors == []
    entries = store.get_entries(ids)
    assert {entry.attempts for entry in entries.values()} == {3}


async def test_a_batch_still_running_after_the_leases_went_never_writes_another_runs_rows(
    store: ArchiveStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second cancellation stops the chunk's close() while its batch is in a thread.

    The chunk then releases its leases and another run may claim the rows before the batch
    reaches the database: the batch must find the lease gone and change nothing.
    """
    (recording_id,) = stored(store, 1)
    real = store.apply_outcomes
    in_thread = threading.Event()

    def slow(outcomes: Any, *, owner: str) -> dict[str, str]:
        in_thread.set()
        time.sleep(0.5)
        return real(outcomes, owner=owner)

    monkeypatch.setattr(store, "apply_outcomes", slow)
    marks = MarkBatch(store, "a", lambda: None, max_wait=60)

    async def chunk() -> None:
        async with marks:
            await marks.add(
                Outcome.archived(recording_id, bucket="b", key="k", size_bytes=1, sha256="ab"),
                lambda: None,
            )
            await asyncio.sleep(10)

    task = asyncio.create_task(chunk())
    await asyncio.sleep(0.05)
    task.cancel()  # the chunk's cancellation: close() sends the batch
    await asyncio.to_thread(in_thread.wait, 5)
    task.cancel()  # a second one, while the batch is in its thread
    with pytest.raises(asyncio.CancelledError):
        await task
    store.release([recording_id], owner="a")  # the chunk's finally
    assert store.claim([recording_id], owner="b", lease_seconds=60, states=WORK) == [recording_id]
    await asyncio.sleep(1.0)  # the batch has reached the database by now
    entry = store.get_entries([recording_id])[recording_id]
    assert (entry.state, entry.lease_owner) == ("pending", "b")


def test_a_marked_partition_whose_file_comes_out_the_same_is_recorded(
    engine: Any, tmp_path: Path
) -> None:
    """A partition due by its mark but byte-identical is left in place and no longer due."""
    from recarchive.export.parquet import export_changed
    from recarchive.store.partitions import mark_partitions
    from tests.test_parquet_rerun import MONTHS, fill

    fill(engine)
    export_changed(engine, str(tmp_path))
    with engine.begin() as connection:
        mark_partitions(connection, ["2025-07"])  # a change the Parquet rows do not show
    report = export_changed(engine, str(tmp_path))
    assert (report.partitions, report.unchanged) == (["2025-07"], ["2025-07"])
    assert export_changed(engine, str(tmp_path)).partitions == []
    full = export_changed(engine, str(tmp_path), full=True)
    assert full.unchanged == list(MONTHS)
