"""Archive ledger on SQLite and PostgreSQL: states, refusals, leases, retries, concurrency."""

from __future__ import annotations

import importlib
import pkgutil
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, update

import recarchive.store
from recarchive.errors import LedgerStateError
from recarchive.model import LEDGER_STATES, RunStatus
from recarchive.normalize import normalize_recording
from recarchive.store.archive import ArchiveStore
from recarchive.store.engine import create_engine_for, upgrade_database
from recarchive.store.tables import archive_ledger, export_partitions, runs
from tests.fixtures.postgres import fresh_postgres_database
from tests.test_normalize import make_payload

WORK = {"pending", "metadata_only", "failed"}
SHA = "ab" * 32

#: The store modules that read this host's clock (``utc_now``, imported by name into each).
STORE_MODULES_WITH_A_CLOCK = [
    module
    for info in pkgutil.iter_modules(recarchive.store.__path__, "recarchive.store.")
    if hasattr(module := importlib.import_module(info.name), "utc_now")
]


def ids(count: int, start: int = 0) -> list[str]:
    return [str(uuid.UUID(int=index + 1)) for index in range(start, start + count)]


def claimed_one(store: ArchiveStore, owner: str = "run-a") -> str:
    (recording_id,) = ids(1)
    store.register([recording_id])
    assert store.claim([recording_id], owner=owner, lease_seconds=60, states=WORK) == [recording_id]
    return recording_id


def test_register_is_idempotent_and_pending(store: ArchiveStore) -> None:
    batch = ids(1203)
    store.register(batch)
    store.register(batch[:10])
    entries = store.get_entries(batch)
    assert len(entries) == 1203
    entry = entries[batch[0]]
    assert entry.state == "pending" and entry.attempts == 0 and entry.lease_owner is None
    assert store.counts() == {
        "pending": 1203,
        "metadata_only": 0,
        "archived": 0,
        "missing": 0,
        "failed": 0,
        "erased": 0,
    }
    assert set(store.counts()) == set(LEDGER_STATES)
    assert store.get_entries(ids(1, start=5000)) == {}


def test_claim_is_exclusive_and_release_frees(store: ArchiveStore) -> None:
    batch = ids(10)
    store.register(batch)
    first = store.claim(batch[:6], owner="a", lease_seconds=60, states=WORK)
    assert first == batch[:6]
    second = store.claim(batch, owner="b", lease_seconds=60, states=WORK)
    assert second == batch[6:]
    entry = store.get_entries([batch[0]])[batch[0]]
    assert entry.lease_owner == "a" and entry.lease_expires_at is not None
    assert entry.lease_expires_at > datetime.now(UTC) + timedelta(seconds=50)
    # Release only frees the owner's own leases.
    store.release(batch, owner="a")
    assert store.get_entries([batch[6]])[batch[6]].lease_owner == "b"
    assert store.claim(batch, owner="c", lease_seconds=60, states=WORK) == batch[:6]


def test_claim_respects_states(store: ArchiveStore) -> None:
    recording_id = claimed_one(store)
    store.mark_missing(recording_id, owner="run-a", error="NotFoundError: 404")
    assert store.claim([recording_id], owner="b", lease_seconds=60, states=WORK) == []
    assert store.claim([recording_id], owner="b", lease_seconds=60, states={"missing"}) == [
        recording_id
    ]


def test_expired_lease_can_be_claimed_by_another_owner(engine: Engine, store: ArchiveStore) -> None:
    recording_id = claimed_one(store, owner="crashed")
    assert store.claim([recording_id], owner="next", lease_seconds=60, states=WORK) == []
    with engine.begin() as connection:
        connection.execute(
            update(archive_ledger).values(lease_expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    assert store.claim([recording_id], owner="next", lease_seconds=60, states=WORK) == [
        recording_id
    ]
    # The crashed run lost its lease: its late outcome is refused.
    with pytest.raises(LedgerStateError, match="lease"):
        store.mark_failed(recording_id, owner="crashed", error="x", retry_at=None)


def test_short_lease_expires_in_real_time(store: ArchiveStore) -> None:
    recording_id = claimed_one(store, owner="a")
    store.claim([recording_id], owner="a", lease_seconds=1, states=WORK)
    time.sleep(1.2)
    assert store.claim([recording_id], owner="b", lease_seconds=60, states=WORK) == [recording_id]


def test_transitions_and_fields(engine: Engine, store: ArchiveStore) -> None:
    recording_id = claimed_one(store)
    retry_at = datetime.now(UTC) + timedelta(minutes=5)
    store.mark_failed(recording_id, owner="run-a", error="ServerError: 503", retry_at=retry_at)
    entry = store.get_entries([recording_id])[recording_id]
    assert entry.state == "failed" and entry.attempts == 1
    assert entry.last_error == "ServerError: 503" and entry.lease_owner is None
    assert entry.next_attempt_at is not None
    assert abs(entry.next_attempt_at - retry_at) < timedelta(milliseconds=1)

    store.claim([recording_id], owner="run-a", lease_seconds=60, states=WORK)
    store.mark_failed(recording_id, owner="run-a", error="again", retry_at=None)
    entry = store.get_entries([recording_id])[recording_id]
    assert entry.attempts == 2 and entry.next_attempt_at is None

    store.claim([recording_id], owner="run-a", lease_seconds=60, states=WORK)
    store.mark_metadata_only(recording_id, owner="run-a", reason="status completed")
    entry = store.get_entries([recording_id])[recording_id]
    assert entry.state == "metadata_only" and entry.last_error == "status completed"

    store.claim([recording_id], owner="run-a", lease_seconds=60, states=WORK)
    store.mark_archived(
        recording_id, owner="run-a", bucket="bkt", key="k/1.mp3", size_bytes=123, sha256=SHA
    )
    entry = store.get_entries([recording_id])[recording_id]
    assert entry.state == "archived" and entry.s3_bucket == "bkt" and entry.s3_key == "k/1.mp3"
    assert entry.size_bytes == 123 and entry.sha256 == SHA and entry.last_error is None
    assert entry.archived_at is not None and entry.lease_owner is None
    assert store.counts()["archived"] == 1
    assert [e.recording_id for e in store.iter_archived(batch_size=10)] == [recording_id]


@pytest.mark.parametrize("mark", ["metadata_only", "missing", "failed"])
def test_archived_is_never_moved_back(store: ArchiveStore, mark: str) -> None:
    recording_id = claimed_one(store)
    store.mark_archived(recording_id, owner="run-a", bucket="b", key="k", size_bytes=1, sha256=SHA)
    store.claim([recording_id], owner="run-a", lease_seconds=60, states={"archived"})
    with pytest.raises(LedgerStateError, match="archived already"):
        if mark == "metadata_only":
            store.mark_metadata_only(recording_id, owner="run-a", reason="r")
        elif mark == "missing":
            store.mark_missing(recording_id, owner="run-a", error="404")
        else:
            store.mark_failed(recording_id, owner="run-a", error="e", retry_at=None)
    assert store.get_entries([recording_id])[recording_id].state == "archived"


def test_transition_needs_the_lease(store: ArchiveStore) -> None:
    (recording_id,) = ids(1)
    store.register([recording_id])
    with pytest.raises(LedgerStateError, match="lease"):
        store.mark_archived(
            recording_id, owner="nobody", bucket="b", key="k", size_bytes=1, sha256=SHA
        )
    store.claim([recording_id], owner="a", lease_seconds=60, states=WORK)
    with pytest.raises(LedgerStateError, match="lease"):
        store.mark_missing(recording_id, owner="b", error="404")
    with pytest.raises(LedgerStateError, match="not in the ledger"):
        store.mark_missing(ids(1, start=99)[0], owner="a", error="404")
    assert store.get_entries([recording_id])[recording_id].state == "pending"


def test_mark_archived_marks_the_partition(engine: Engine, store: ArchiveStore) -> None:
    record = normalize_recording(make_payload(0), workspace_id="ws", fetched_at=datetime.now(UTC))
    store.save_metadata([record])
    store.register([record.id])
    store.claim([record.id], owner="a", lease_seconds=60, states=WORK)
    with engine.connect() as connection:
        before = connection.execute(export_partitions.select()).one().version
    store.mark_archived(record.id, owner="a", bucket="b", key="k", size_bytes=1, sha256=SHA)
    with engine.connect() as connection:
        after = connection.execute(export_partitions.select()).one().version
    assert after == before + 1


def test_due_retries(engine: Engine, store: ArchiveStore) -> None:
    batch = ids(6)
    store.register(batch)
    store.claim(batch, owner="a", lease_seconds=60, states=WORK)
    now = datetime.now(UTC)
    store.mark_failed(batch[0], owner="a", error="e", retry_at=now - timedelta(minutes=1))
    store.mark_failed(batch[1], owner="a", error="e", retry_at=now - timedelta(minutes=5))
    store.mark_failed(batch[2], owner="a", error="e", retry_at=now + timedelta(hours=1))
    store.mark_failed(batch[3], owner="a", error="terminal", retry_at=None)
    store.mark_failed(batch[4], owner="a", error="e", retry_at=now - timedelta(minutes=2))
    with engine.begin() as connection:  # exhausted attempts
        connection.execute(
            update(archive_ledger)
            .where(archive_ledger.c.recording_id == batch[4])
            .values(attempts=8)
        )
    assert store.due_retries(limit=10, max_attempts=8) == [batch[1], batch[0]]
    assert store.due_retries(limit=1, max_attempts=8) == [batch[1]]
    assert store.due_retries(limit=10, max_attempts=9) == [batch[1], batch[4], batch[0]]
    # A leased row is not due.
    store.claim([batch[1]], owner="b", lease_seconds=60, states=WORK)
    assert store.due_retries(limit=10, max_attempts=8) == [batch[0]]
    failed = store.failed_entries(limit=10)
    assert {entry.recording_id for entry in failed} == set(batch[:5])
    assert all(entry.state == "failed" for entry in failed)
    assert len(store.failed_entries(limit=2)) == 2


def test_iter_archived_pages_in_id_order(store: ArchiveStore) -> None:
    batch = ids(25)
    store.register(batch)
    store.claim(batch, owner="a", lease_seconds=60, states=WORK)
    for recording_id in batch[::2]:
        store.mark_archived(
            recording_id, owner="a", bucket="b", key=recording_id, size_bytes=1, sha256=SHA
        )
    got = [entry.recording_id for entry in store.iter_archived(batch_size=4)]
    assert got == sorted(batch[::2])


def test_concurrent_claimers_never_share_an_id(database_url: str) -> None:
    """Eight threads, each with its own engine (own connections), claim overlapping sets."""
    setup = create_engine_for(database_url)
    upgrade_database(setup)
    batch = ids(400)
    ArchiveStore(setup).register(batch)
    setup.dispose()
    results: dict[str, list[str]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(owner: str, offset: int) -> None:
        engine = create_engine_for(database_url)
        try:
            store = ArchiveStore(engine)
            rotated = batch[offset:] + batch[:offset]
            barrier.wait()
            got: list[str] = []
            for start in range(0, len(rotated), 50):
                got += store.claim(
                    rotated[start : start + 50], owner=owner, lease_seconds=60, states=WORK
                )
            results[owner] = got
        except BaseException as exc:
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=worker, args=(f"w{n}", n * 50)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    everything = [rid for got in results.values() for rid in got]
    assert len(everything) == len(set(everything)), "an ID was claimed twice"
    assert sorted(everything) == sorted(batch), "every free ID was claimed by someone"
    check = create_engine_for(database_url)
    try:
        entries = ArchiveStore(check).get_entries(batch)
        for owner, got in results.items():
            assert all(entries[rid].lease_owner == owner for rid in got)
    finally:
        check.dispose()


def test_renew_extends_only_the_owners_leases(store: ArchiveStore) -> None:
    first, second = ids(2)
    store.register([first, second])
    assert store.claim([first], owner="run-a", lease_seconds=10, states={"pending"}) == [first]
    assert store.claim([second], owner="run-b", lease_seconds=10, states={"pending"}) == [second]
    before = store.get_entries([first, second])
    assert store.renew([first, second], owner="run-a", lease_seconds=3600) == 1
    after = store.get_entries([first, second])
    old, new = before[first].lease_expires_at, after[first].lease_expires_at
    assert old is not None and new is not None and new > old + timedelta(minutes=50)
    assert after[second].lease_expires_at == before[second].lease_expires_at


# --- stranded rows: pending rows that no live run holds ----------------------------------


def test_pending_rows_of_a_live_run_are_left_to_it(engine: Engine, store: ArchiveStore) -> None:
    batch = ids(4)
    run_id = store.start_run("archive", {}, owner="host:1:a")
    store.register(iter(batch), run_id=run_id)  # streamed: any iterable
    # Registered, never claimed (chunks the run has not reached yet): not due.
    assert store.due_retries(limit=10, max_attempts=8) == []
    store.finish_run(run_id, status=RunStatus.PARTIAL, counts={})
    assert store.due_retries(limit=10, max_attempts=8) == batch


def test_pending_rows_of_a_run_that_stopped_beating_are_due(
    engine: Engine, store: ArchiveStore
) -> None:
    batch = ids(3)
    run_id = store.start_run("archive", {}, owner="otherhost:1:a")  # killed on another host
    store.register(batch, run_id=run_id)
    assert store.due_retries(limit=10, max_attempts=8, stale_after=timedelta(minutes=15)) == []
    with engine.begin() as connection:
        connection.execute(
            update(runs).values(heartbeat_at=datetime.now(UTC) - timedelta(minutes=16))
        )
    assert store.due_retries(limit=10, max_attempts=8, stale_after=timedelta(minutes=15)) == batch
    store.beat(run_id)  # alive after all: left to it again
    assert store.due_retries(limit=10, max_attempts=8, stale_after=timedelta(minutes=15)) == []


def test_pending_rows_without_a_run_and_expired_leases_are_due(
    engine: Engine, store: ArchiveStore
) -> None:
    batch = ids(3)
    store.register(batch)  # no run: registered before revision 0003, or by a bare chunk
    store.claim(batch[:1], owner="a", lease_seconds=60, states=WORK)
    store.claim(batch[1:2], owner="b", lease_seconds=60, states=WORK)
    with engine.begin() as connection:
        connection.execute(
            update(archive_ledger)
            .where(archive_ledger.c.recording_id == batch[1])
            .values(lease_expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    # batch[0] holds a live lease; batch[1]'s lease expired; batch[2] was never claimed.
    assert store.due_retries(limit=10, max_attempts=8) == [batch[1], batch[2]]


def test_a_new_run_takes_over_the_registration_of_free_pending_rows(
    store: ArchiveStore,
) -> None:
    batch = ids(3)
    dead = store.start_run("archive", {}, owner="h:1:a")
    store.register(batch, run_id=dead)
    store.claim(batch[:1], owner="a", lease_seconds=60, states=WORK)
    store.mark_failed(batch[0], owner="a", error="e", retry_at=None)
    store.finish_run(dead, status=RunStatus.INTERRUPTED, counts={})
    live = store.start_run("archive", {}, owner="h:2:b")
    store.register(batch, run_id=live)
    # The two pending rows are the live run's now; the failed row is not pending (and
    # terminal), so nothing is due.
    assert store.due_retries(limit=10, max_attempts=8) == []


def test_a_million_ids_register_in_bounded_memory(store: ArchiveStore) -> None:
    import tracemalloc

    count = 200_000
    generated = (str(uuid.UUID(int=index + 1)) for index in range(count))
    tracemalloc.start()
    try:
        assert store.register(generated, run_id=None) == count
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert store.counts()["pending"] == count
    # One batch of 5,000 rows at a time, not 200,000 (which takes well over 100 MB as dicts).
    assert peak < 40 * 1024 * 1024, peak


@pytest.mark.postgres
def test_leases_follow_the_database_clock_not_the_host_clock(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host whose clock runs an hour ahead neither takes a live lease nor sets skewed ones."""
    with fresh_postgres_database(postgres_url) as url:
        engine = create_engine_for(url)
        try:
            upgrade_database(engine)
            store = ArchiveStore(engine)
            batch = ids(2)
            store.register(batch)
            assert store.claim(batch[:1], owner="a", lease_seconds=600, states=WORK) == batch[:1]
            skewed = datetime.now(UTC) + timedelta(hours=1)
            # Every clock of this host the store reads: each store module that imports it.
            for module in STORE_MODULES_WITH_A_CLOCK:
                monkeypatch.setattr(module, "utc_now", lambda: skewed)
            assert store.claim(batch, owner="b", lease_seconds=600, states=WORK) == batch[1:]
            assert store.due_retries(limit=10, max_attempts=8) == []
            expires = store.get_entries(batch[1:])[batch[1]].lease_expires_at
            assert expires is not None
            assert abs((expires - datetime.now(UTC)).total_seconds() - 600) < 60
        finally:
            engine.dispose()


def test_leases_of_a_dead_run_are_free_at_once(engine: Engine, store: ArchiveStore) -> None:
    batch = ids(2)
    dead = store.start_run("archive", {}, owner="otherhost:7:dead")
    store.register(batch, run_id=dead)
    assert store.claim(batch, owner="otherhost:7:dead", lease_seconds=900, states=WORK) == batch
    # Alive: its leases hold, for claims and for retry-failed alike.
    assert store.claim(batch, owner="me", lease_seconds=60, states=WORK) == []
    assert store.due_retries(limit=10, max_attempts=8) == []
    with engine.begin() as connection:  # it stops beating (killed on its host)
        connection.execute(
            update(runs).values(heartbeat_at=datetime.now(UTC) - timedelta(minutes=20))
        )
    assert store.due_retries(limit=10, max_attempts=8) == batch
    assert store.claim(batch, owner="me", lease_seconds=60, states=WORK) == batch


def test_a_long_lease_holds_while_its_run_beats(engine: Engine, store: ArchiveStore) -> None:
    """Staleness is one fixed limit: a run with an hour's lease, beating every minute, keeps it."""
    from recarchive.store.ledger import DEFAULT_STALE_AFTER, HEARTBEAT_SECONDS

    assert DEFAULT_STALE_AFTER.total_seconds() >= 3 * HEARTBEAT_SECONDS
    batch = ids(2)
    run = store.start_run("archive", {}, owner="otherhost:9:long")
    store.register(batch, run_id=run)
    assert store.claim(batch, owner="otherhost:9:long", lease_seconds=3600, states=WORK) == batch
    late_beat = DEFAULT_STALE_AFTER - timedelta(seconds=HEARTBEAT_SECONDS)
    with engine.begin() as connection:
        connection.execute(update(runs).values(heartbeat_at=datetime.now(UTC) - late_beat))
    assert store.claim(batch, owner="me", lease_seconds=60, states=WORK) == []
