"""Ledger outcomes in batches (SQLite and PostgreSQL) and the chunk's batcher of marks.

The store's side: one transaction per batch whatever its size, the conditions of every
transition (lease, archived is final, the pinned key), refusals with their reasons, one
partition mark per month, the first pin of an S3 key winning. The batcher's side
(:class:`~recarchive.run.marks.MarkBatch`, on both backends too): an item counts only once its
batch is confirmed, batches go when full, when the oldest waited long enough, and at the end,
and a database that is down stops the chunk with the fatal error.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, select
from sqlalchemy.exc import OperationalError

from recarchive.config import Settings
from recarchive.errors import StorageUnavailableError
from recarchive.normalize import normalize_recording
from recarchive.run.chunk import archive_chunk
from recarchive.run.clients import open_archive_context
from recarchive.run.context import ChunkOptions
from recarchive.run.database import open_store
from recarchive.run.marks import MarkBatch
from recarchive.store import bulk
from recarchive.store.archive import ArchiveStore
from recarchive.store.outcomes import Outcome, _row_values, _sqlite_update
from recarchive.store.tables import export_partitions
from tests.fixtures.simulator import SimulatorFactory
from tests.test_normalize import make_payload

WORK = {"pending", "metadata_only", "failed"}
SHA = "cd" * 32
JULY = datetime(2025, 7, 10, tzinfo=UTC)
AUGUST = datetime(2025, 8, 10, tzinfo=UTC)


def rid(index: int) -> str:
    """The ID ``make_payload(index)`` gives its recording."""
    return str(uuid.UUID(int=index + 1))


def stored(store: ArchiveStore, count: int, *, owner: str = "a") -> list[str]:
    """``count`` recordings with metadata (even ones in July, odd ones in August), leased."""
    records = [
        normalize_recording(
            make_payload(index, created=JULY if index % 2 == 0 else AUGUST),
            workspace_id="ws",
            fetched_at=datetime.now(UTC),
        )
        for index in range(count)
    ]
    store.save_metadata(records)
    ids = [record.id for record in records]
    store.register(ids)
    assert store.claim(ids, owner=owner, lease_seconds=60, states=WORK) == ids
    return ids


def versions(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(export_partitions.c.created_month, export_partitions.c.version)
        )
        return {month: version for month, version in rows}


@contextmanager
def sql_counted(engine: Engine) -> Iterator[Counter[str]]:
    """Count statements sent (an ``executemany`` is one) and commits on ``engine``."""
    counts: Counter[str] = Counter()

    def on_execute(*_: Any) -> None:
        counts["statements"] += 1

    def on_commit(*_: Any) -> None:
        counts["commits"] += 1

    event.listen(engine, "before_cursor_execute", on_execute)
    event.listen(engine, "commit", on_commit)
    try:
        yield counts
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)
        event.remove(engine, "commit", on_commit)


def test_a_batch_applies_each_outcome_and_refuses_with_reasons(
    engine: Engine, store: ArchiveStore
) -> None:
    ids = stored(store, 8)
    store.pin_key(ids[4], owner="a", bucket="b", key="pinned/4.mp3")
    store.release([ids[5]], owner="a")
    assert store.claim([ids[5]], owner="other", lease_seconds=60, states=WORK) == [ids[5]]
    store.mark_archived(ids[6], owner="a", bucket="b", key="k/6.mp3", size_bytes=6, sha256=SHA)
    before = versions(engine)
    retry_at = datetime.now(UTC) + timedelta(hours=1)
    unknown = rid(99)

    refused = store.apply_outcomes(
        [
            Outcome.metadata_only(ids[0], reason="status completed", retry_at=retry_at),
            Outcome.missing(ids[1], error="NotFoundError: 404"),
            Outcome.failed(ids[2], error="ServerError: 503", retry_at=retry_at),
            Outcome.archived(ids[3], bucket="b", key="k/3.mp3", size_bytes=3, sha256=SHA),
            Outcome.archived(ids[4], bucket="b", key="elsewhere/4.mp3", size_bytes=4, sha256=SHA),
            Outcome.metadata_only(ids[5], reason="skip-media"),
            Outcome.failed(ids[6], error="late", retry_at=None),
            Outcome.missing(unknown, error="404"),
            Outcome.archived(ids[7], bucket="b", key="k/7.mp3", size_bytes=7, sha256=SHA),
        ],
        owner="a",
    )

    assert refused == {
        ids[4]: "another S3 key is pinned for it",
        ids[5]: "this run does not hold its lease",
        ids[6]: "it is archived already",
        unknown: "it is not in the ledger",
    }
    entries = store.get_entries(ids)
    assert [entries[i].state for i in ids] == [
        "metadata_only",
        "missing",
        "failed",
        "archived",
        "pending",  # refused: unchanged, still leased
        "pending",
        "archived",
        "archived",
    ]
    first, _, failed, archived, kept, other, final, _ = (entries[i] for i in ids)
    assert first.last_error == "status completed" and first.next_attempt_at is not None
    assert abs(first.next_attempt_at - retry_at) < timedelta(milliseconds=1)
    assert failed.attempts == 1 and failed.last_error == "ServerError: 503"
    assert (archived.s3_bucket, archived.s3_key, archived.size_bytes) == ("b", "k/3.mp3", 3)
    assert archived.sha256 == SHA and archived.archived_at is not None
    assert archived.last_error is None and archived.next_attempt_at is None
    assert (kept.lease_owner, kept.s3_key) == ("a", "pinned/4.mp3")
    assert other.lease_owner == "other" and final.s3_key == "k/6.mp3"
    assert all(entries[i].lease_owner is None for i in (ids[0], ids[1], ids[2], ids[3], ids[7]))
    # One bump per month of the batch, however many of its recordings changed.
    after = versions(engine)
    assert {month: after[month] - before[month] for month in after} == {
        "2025-07": 1,
        "2025-08": 1,
    }


@pytest.mark.parametrize("size", [8, 200])
def test_one_transaction_per_batch_whatever_its_size(
    engine: Engine, store: ArchiveStore, size: int
) -> None:
    ids = stored(store, size)
    outcomes = [
        Outcome.archived(i, bucket="b", key=f"k/{i}.mp3", size_bytes=1, sha256=SHA)
        if index % 2
        else Outcome.metadata_only(i, reason="skip-media")
        for index, i in enumerate(ids)
    ]
    with sql_counted(engine) as counts:
        assert store.apply_outcomes(outcomes, owner="a") == {}
    # SQLite: BEGIN IMMEDIATE, the rows read, one executemany, the partition mark.
    # PostgreSQL: one UPDATE ... FROM unnest(...) RETURNING, the partition mark.
    assert counts["commits"] == 1
    assert counts["statements"] <= 4, counts
    assert store.counts()["archived"] == size // 2


def test_outcomes_of_one_recording_apply_in_their_order(store: ArchiveStore) -> None:
    (first, second) = stored(store, 2)
    refused = store.apply_outcomes(
        [
            Outcome.failed(first, error="e", retry_at=None),
            Outcome.archived(first, bucket="b", key="k", size_bytes=1, sha256=SHA),
            Outcome.archived(second, bucket="b", key="k2", size_bytes=1, sha256=SHA),
            Outcome.failed(second, error="e", retry_at=None),
        ],
        owner="a",
    )
    # The first outcome of each freed the lease: the second finds it gone.
    assert refused == {
        first: "this run does not hold its lease",
        second: "it is archived already",
    }
    entries = store.get_entries([first, second])
    assert (entries[first].state, entries[second].state) == ("failed", "archived")


def test_pin_keys_pins_first_and_only_leased_rows(engine: Engine, store: ArchiveStore) -> None:
    ids = stored(store, 3)
    store.pin_key(ids[0], owner="a", bucket="old-bucket", key="first/0.mp3")
    store.release([ids[2]], owner="a")
    with sql_counted(engine) as counts:
        pinned = store.pin_keys(
            {i: f"now/{n}.mp3" for n, i in enumerate(ids)}, owner="a", bucket="b"
        )
    assert counts["commits"] == 1
    assert pinned == {ids[0]: ("old-bucket", "first/0.mp3"), ids[1]: ("b", "now/1.mp3")}
    assert store.get_entries([ids[2]])[ids[2]].s3_key is None  # not leased: not pinned


# --- the chunk's batcher ---------------------------------------------------------------------


def skipped(ids: list[str]) -> list[Outcome]:
    return [Outcome.metadata_only(i, reason="skip-media") for i in ids]


async def test_an_item_counts_once_its_batch_is_confirmed(store: ArchiveStore) -> None:
    ids = stored(store, 3)
    confirmed: list[str] = []
    marks = MarkBatch(store, "a", lambda: None, max_pending=10, max_wait=0.3)
    for outcome in skipped(ids):
        await marks.add(outcome, functools.partial(confirmed.append, outcome.recording_id))
    # Queued, not written: nothing counts yet, and the rows are still pending and leased.
    assert confirmed == []
    assert {e.state for e in store.get_entries(ids).values()} == {"pending"}
    await asyncio.sleep(1.0)  # the oldest waited max_wait: the batch went without a call
    assert confirmed == ids and marks.flushes == 1
    assert {e.state for e in store.get_entries(ids).values()} == {"metadata_only"}
    await marks.close()
    assert marks.flushes == 1  # nothing left to write


async def test_a_full_batch_goes_at_once_and_the_rest_at_close(
    store: ArchiveStore,
) -> None:
    ids = stored(store, 10)
    marks = MarkBatch(store, "a", lambda: None, max_pending=4, max_wait=60)
    confirmed: list[str] = []
    for outcome in skipped(ids):
        await marks.add(outcome, functools.partial(confirmed.append, outcome.recording_id))
    assert confirmed == ids[:8] and marks.flushes == 2
    await marks.close()
    assert confirmed == ids and marks.flushes == 3


async def test_a_refused_mark_goes_to_on_refused(store: ArchiveStore) -> None:
    ids = stored(store, 2)
    store.release([ids[1]], owner="a")
    refused: list[int] = []
    confirmed: list[str] = []
    async with MarkBatch(store, "a", lambda: refused.append(1)) as marks:
        for outcome in skipped(ids):
            await marks.add(outcome, functools.partial(confirmed.append, outcome.recording_id))
    assert confirmed == ids[:1] and refused == [1]


def down(*_: Any, **__: Any) -> dict[str, str]:
    raise OperationalError("UPDATE archive_ledger", {}, ConnectionRefusedError("down"))


async def test_a_database_that_is_down_stops_the_chunk(
    store: ArchiveStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = stored(store, 3)
    monkeypatch.setattr(store, "apply_outcomes", down)
    confirmed: list[str] = []
    marks = MarkBatch(store, "a", lambda: None, max_pending=2, max_wait=60)
    await marks.add(skipped(ids)[0], lambda: confirmed.append("0"))
    with pytest.raises(StorageUnavailableError, match="could not update the ledger"):
        await marks.add(skipped(ids)[1], lambda: confirmed.append("1"))
    with pytest.raises(StorageUnavailableError):  # every later mark is refused as well
        await marks.add(skipped(ids)[2], lambda: confirmed.append("2"))
    assert confirmed == []


async def test_a_timed_batch_that_fails_is_raised_at_close(
    store: ArchiveStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = stored(store, 1)
    monkeypatch.setattr(store, "apply_outcomes", down)
    marks = MarkBatch(store, "a", lambda: None, max_wait=0.05)
    await marks.add(skipped(ids)[0], lambda: None)
    await asyncio.sleep(0.5)
    with pytest.raises(StorageUnavailableError, match="OperationalError"):
        await marks.close()


async def test_after_a_failed_block_what_finished_is_marked_and_its_error_raised(
    store: ArchiveStore,
) -> None:
    ids = stored(store, 2)
    confirmed: list[str] = []
    with pytest.raises(RuntimeError, match="sibling"):
        async with MarkBatch(store, "a", lambda: None, max_wait=60) as marks:
            await marks.add(skipped(ids)[0], lambda: confirmed.append(ids[0]))
            raise RuntimeError("a sibling's fatal error")
    assert confirmed == ids[:1]
    assert store.get_entries(ids)[ids[0]].state == "metadata_only"
    assert store.get_entries(ids)[ids[1]].lease_owner == "a"  # released by the chunk


async def test_a_chunk_commits_per_batch_not_per_recording(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> None:
    sim = simulator_factory(recordings=300, seed=73)
    settings = Settings(
        bird_api_url=sim.api_url,
        bird_access_key=sim.config.access_key,
        workspace_id=sim.config.workspace_id,
        database_url=f"sqlite:///{tmp_path / 'archive.db'}",
        requests_per_second=100_000,
    )
    engine, store = open_store(settings)
    try:
        async with open_archive_context(settings, store, skip_media=True) as ctx:
            with sql_counted(engine) as sql:
                counts = await archive_chunk(ctx, sim.dataset.ids, ChunkOptions(skip_media=True))
        assert counts.metadata_only + counts.missing == 300, counts
        assert store.counts()["metadata_only"] == counts.metadata_only
    finally:
        engine.dispose()
    # Registration, claim, metadata, release, and at most ceil(300 / 64) + a few timed
    # batches of marks; one commit per recording would be 300 more.
    print(f"chunk of 300: {sql['commits']} commits, {sql['statements']} statements")
    assert sql["commits"] <= 15, sql


def test_the_driver_path_refuses_rows_without_a_value_for_a_parameter(
    sqlite_engine: Engine,
) -> None:
    # SQLAlchemy refuses a missing bind value; SQLite's driver path must not bind NULL for it.
    (recording,) = stored(ArchiveStore(sqlite_engine), 1)
    now = datetime.now(UTC)
    row = {**_row_values(Outcome.metadata_only(recording, reason="x"), now), "b_owner": "a"}
    del row["b_error"]
    with sqlite_engine.begin() as connection, pytest.raises(ValueError, match="b_error"):
        bulk.executemany_bound(connection, _sqlite_update(), [{**row, "b_now": now}])
