"""Crash safety: ``recarchive archive`` killed with SIGKILL at random points, then rerun.

Each trial runs the real console script as a child process, configured only by the contract's
environment variables, against an in-process Bird simulator (slow responses and 500s, so the
run lasts long enough to be cut anywhere) and an S3 server with a *versioned* bucket: a
second write of a media key would leave a second version behind. Every trial runs on moto and
on SeaweedFS, which, unlike moto, checks each body's SHA-256 as S3 does (both count versions
alike: ``tests/test_s3_integrity.py``). The child is killed with
SIGKILL after a seeded random delay spread over the run's work, so nothing of it unwinds: no
lease released, no multipart upload aborted, no temp file removed, no ``finally`` run. Then
``recarchive retry-failed`` alone runs to completion (no rerun of the same input: the killed
run registered every ID before its first request, and its rows — claimed, or never reached —
are due once the run is dead), and the trial checks what the issues ask:

* every available recording is archived exactly once: one object version per media key, its
  bytes hash to the simulator's bytes, and what the killed run had stored is not downloaded
  from Bird again;
* no multipart upload is left open;
* the ledger agrees with S3 (key, size, SHA-256) and holds no lease;
* no temp file is left behind (the next run removes those of dead processes), and the
  killed run's ``runs`` row is finished as ``interrupted``.

Some recordings are above the (lowered) multipart threshold, so kills also land mid-multipart.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from recarchive.leases import (
    active_owner,
    local_owner_dead,
    owner_pid_on_host,
    pid_alive,
    release_dead_leases,
)
from recarchive.media.keys import media_key, sidecar_key
from recarchive.media.s3 import MediaStore
from recarchive.model import LedgerEntry
from recarchive.simulator.server import SimulatorServer
from recarchive.store.archive import ArchiveStore
from recarchive.store.engine import create_engine_for, upgrade_database
from tests.fixtures.s3 import AWS_ENV
from tests.fixtures.simulator import SimulatorFactory

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

TRIALS = 20
RECORDINGS = 10
BIG = 6_000_000  # above the 5 MiB multipart threshold below: two parts of 5 MiB and the rest
BIG_COUNT = 3
MIB5 = 5 * 1024 * 1024
#: Seconds after the run's first API request within which the kills fall: the work takes
#: 1.9 s at least at the pacing below (its 19 API requests after the first, at 10 a second),
#: 2-3 s on the machines seen (see the lines printed with ``-s``); at 20 a second a fast
#: machine finished it in 1.3 s, before the last kills. Trial n is killed at a
#: seeded random point of the n-th tenth of the window, so the kills cover the whole run.
KILL_WINDOW = 1.6
PREFIX = "recordings"
RECARCHIVE = str(Path(sys.executable).with_name("recarchive"))

pytestmark = pytest.mark.timeout(120)


@dataclass
class Trial:
    """What one trial needs to run and check the CLI."""

    sim: SimulatorServer
    env: dict[str, str]
    ids_file: Path
    temp_dir: Path
    workdir: Path

    def start(self, log_name: str, *command: str) -> subprocess.Popen[bytes]:
        """Start ``recarchive COMMAND`` (``archive --ids-file …`` by default)."""
        log = (self.workdir / log_name).open("wb")
        try:
            return subprocess.Popen(
                [RECARCHIVE, *(command or ("archive", "--ids-file", str(self.ids_file)))],
                env=self.env,
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()

    def output(self, log_name: str) -> str:
        return (self.workdir / log_name).read_text(errors="replace")


@pytest.fixture
def s3_endpoint(any_s3_endpoint: str) -> str:
    """The trials run on each S3 server (``[moto-...]``, ``[seaweedfs-...]``)."""
    return any_s3_endpoint


@pytest.fixture
def trial(
    simulator_factory: SimulatorFactory,
    s3_endpoint: str,
    s3_client: S3Client,
    s3_bucket: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Trial:
    callspec = getattr(request.node, "callspec", None)
    number = int(callspec.params.get("number", TRIALS)) if callspec else TRIALS
    s3_client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    sim = simulator_factory(
        recordings=RECORDINGS,
        seed=500 + number,
        faults="slow,500",
        available_fraction=0.8,
        media_size_range=(200_000, 900_000),
    )
    for recording_id in sim.dataset.available_ids()[:BIG_COUNT]:
        sim.dataset.set_media_size(recording_id, BIG)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join(sim.dataset.ids) + "\n")
    temp_dir = tmp_path / "temp"
    temp_dir.mkdir()
    env = {
        **{name: value for name, value in os.environ.items() if not name.startswith("RECARCHIVE_")},
        **AWS_ENV,
        "RECARCHIVE_BIRD_API_URL": sim.api_url,
        "RECARCHIVE_BIRD_ACCESS_KEY": sim.config.access_key,
        "RECARCHIVE_WORKSPACE_ID": sim.config.workspace_id,
        "RECARCHIVE_DATABASE_URL": f"sqlite:///{tmp_path / 'archive.db'}",
        "RECARCHIVE_PARQUET_ROOT": str(tmp_path / "parquet"),
        "RECARCHIVE_S3_BUCKET": s3_bucket,
        "RECARCHIVE_S3_ENDPOINT_URL": s3_endpoint,
        "RECARCHIVE_S3_MULTIPART_THRESHOLD_BYTES": str(MIB5),
        "RECARCHIVE_S3_MULTIPART_CHUNK_BYTES": str(MIB5),
        # Paced and narrow, so the work spreads over a few seconds and a kill can land in any
        # phase: metadata, download, single PUT, multipart parts, read-back, ledger marks.
        "RECARCHIVE_REQUESTS_PER_SECOND": "10",
        "RECARCHIVE_CONCURRENCY": "3",
        "RECARCHIVE_TEMP_DIR": str(temp_dir),
    }
    return Trial(sim, env, ids_file, temp_dir, tmp_path)


@contextmanager
def killed_at_the_end(
    process: subprocess.Popen[bytes],
) -> Iterator[subprocess.Popen[bytes]]:
    """SIGKILL ``process`` when the block ends (nothing of it unwinds) and reap it.

    When the block fails, the process is killed all the same, so no run outlives the test.
    """
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)


def _wait_for_first_request(sim: SimulatorServer, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not sim.api_requests():
        assert process.poll() is None, "the run ended before its first request"
        assert time.monotonic() < deadline, "the run made no request within 30 s"
        time.sleep(0.01)


def _snapshot(trial: Trial, store: MediaStore, s3_client: S3Client, bucket: str) -> str:
    """Describe what the killed run left behind (printed with ``-s``; helps read a failure)."""
    listed = s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])
    media = sum(1 for obj in listed if obj["Key"].endswith(".mp3"))
    ledger = ArchiveStore(create_engine_for(trial.env["RECARCHIVE_DATABASE_URL"]))
    try:
        states = {state: n for state, n in ledger.counts().items() if n}
    except Exception:  # the kill may come before the schema exists
        states = {}
    finally:
        ledger.engine.dispose()
    return (
        f"objects {media}, open uploads {len(store.list_open_multipart_uploads())}, "
        f"temp files {len(list(trial.temp_dir.iterdir()))}, ledger {states}"
    )


def stored_media_ids(s3_client: S3Client, bucket: str) -> set[str]:
    """Recording IDs whose MP3 object is in the bucket."""
    listed = s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {
        obj["Key"].rsplit("/", 1)[-1].removesuffix(".mp3")
        for obj in listed
        if obj["Key"].endswith(".mp3")
    }


def run_statuses(trial: Trial) -> dict[int, str]:
    """Status of every ``runs`` row, by id."""
    ledger = ArchiveStore(create_engine_for(trial.env["RECARCHIVE_DATABASE_URL"]))
    try:
        return {run["id"]: run["status"] for run in ledger.last_runs(limit=100)}
    finally:
        ledger.engine.dispose()


def assert_archived_exactly_once(
    trial: Trial, s3_client: S3Client, s3_bucket: str, *, killed_running: Sequence[int]
) -> None:
    """Every available recording archived once, ledger == S3, nothing open or left behind.

    ``killed_running``: ``runs`` rows that said ``running`` after the kill; the rerun must have
    finished them as ``interrupted``.
    """
    sim = trial.sim
    store = MediaStore(s3_client, bucket=s3_bucket)
    available = set(sim.dataset.available_ids())
    assert len(available) >= BIG_COUNT + 2
    ledger = ArchiveStore(create_engine_for(trial.env["RECARCHIVE_DATABASE_URL"]))
    try:
        entries = ledger.get_entries(sim.dataset.ids)
    finally:
        ledger.engine.dispose()
    versions = s3_client.list_object_versions(Bucket=s3_bucket)
    assert versions.get("DeleteMarkers", []) == []
    media_versions = Counter(
        version["Key"]
        for version in versions.get("Versions", [])
        if version["Key"].endswith(".mp3")
    )

    for recording_id in sim.dataset.ids:
        payload = sim.dataset.payload(recording_id)
        assert payload is not None
        created = datetime.fromisoformat(payload["createdAt"].replace("Z", "+00:00"))
        key = media_key(PREFIX, sim.config.workspace_id, recording_id, created)
        entry = entries[recording_id]
        assert entry.lease_owner is None, f"{recording_id} still leased by {entry.lease_owner}"
        if recording_id not in available:
            assert entry.state == "metadata_only", (recording_id, entry.state, entry.last_error)
            assert media_versions[key] == 0
            continue
        # Archived exactly once: one version of the key, the simulator's bytes.
        assert entry.state == "archived", (recording_id, entry.state, entry.last_error)
        assert media_versions[key] == 1, f"{key} was written {media_versions[key]} times"
        expected = sim.dataset.media(recording_id).sha256()
        size, digest = store.hash_object(key)
        assert digest == expected
        # The ledger agrees with S3: key, size, SHA-256 (the object's metadata too).
        info = store.head(key)
        assert info is not None and info.sha256 == expected and info.size == size
        assert (entry.s3_bucket, entry.s3_key) == (s3_bucket, key)
        assert (entry.size_bytes, entry.sha256) == (size, expected)
        assert store.head(sidecar_key(key)) is not None

    assert len(media_versions) == len(available)
    assert store.list_open_multipart_uploads() == []
    # Neither media temp files nor the killed run's ID spool are left behind.
    assert list(trial.temp_dir.iterdir()) == []
    # The killed run's row was finished by the rerun (unless the kill came after the run had
    # finished it itself); the rerun finished its own.
    statuses = run_statuses(trial)
    assert len(statuses) == 2 and "running" not in statuses.values(), statuses
    assert [statuses[run_id] for run_id in killed_running] == ["interrupted"] * len(killed_running)
    assert sim.leaks == []


#: All trials on moto; every second one on SeaweedFS too (each trial costs ~10 s; SeaweedFS's
#: own integrity checks are shown by tests/test_s3_integrity.py and the media tests).
TRIAL_CASES = [("moto", n) for n in range(TRIALS)] + [("seaweedfs", n) for n in range(0, TRIALS, 2)]


@pytest.mark.parametrize(
    ("s3_backend", "number"), TRIAL_CASES, ids=[f"{b}-{n}" for b, n in TRIAL_CASES]
)
def test_sigkill_then_retry_failed_archives_everything_exactly_once(
    number: int, trial: Trial, s3_client: S3Client, s3_bucket: str
) -> None:
    rng = random.Random(9000 + number)
    sim = trial.sim
    store = MediaStore(s3_client, bucket=s3_bucket)

    # Killed somewhere in the run's work.
    with killed_at_the_end(trial.start("first.log")) as first:
        _wait_for_first_request(sim, first)
        delay = (number + rng.random()) * KILL_WINDOW / TRIALS
        time.sleep(delay)
    assert first.returncode == -signal.SIGKILL, (
        f"the run ended by itself (exit {first.returncode}) before the kill at {delay:.2f} s: "
        f"raise KILL_WINDOW's margin\n{trial.output('first.log')}"
    )
    left = _snapshot(trial, store, s3_client, s3_bucket)
    statuses = run_statuses(trial)
    killed_running = [run_id for run_id, status in statuses.items() if status == "running"]

    stored = stored_media_ids(s3_client, s3_bucket)
    sim.clear_requests()

    # Recovery by `retry-failed` alone (the hourly deployment), at once: the killed run's
    # rows — claimed, registered but never reached — are taken without waiting for a lease.
    started = time.monotonic()
    second = trial.start("second.log", "retry-failed")
    assert second.wait(timeout=90) == 0, trial.output("second.log")
    rerun = time.monotonic() - started
    print(f"trial {number}: killed at {delay:.2f} s ({left}); retry-failed {rerun:.1f} s")

    assert_archived_exactly_once(trial, s3_client, s3_bucket, killed_running=killed_running)
    # Downloaded once: what the killed run had stored is not fetched from Bird again.
    again = {r.path.rsplit("/", 1)[-1].removesuffix(".mp3") for r in sim.media_requests()}
    assert again.isdisjoint(stored), again & stored


def test_sha256_helper_matches_simulator(simulator_factory: SimulatorFactory) -> None:
    # The trials compare S3 bytes with Mp3Source.sha256(): make sure it hashes the served bytes.
    sim = simulator_factory(recordings=3, seed=1, available_fraction=1.0)
    recording_id = sim.dataset.ids[0]
    assert (
        sim.dataset.media(recording_id).sha256()
        == hashlib.sha256(sim.dataset.media_bytes(recording_id)).hexdigest()
    )


def test_sigkill_mid_multipart_upload_then_rerun(
    trial: Trial, s3_client: S3Client, s3_bucket: str
) -> None:
    """Not left to chance: the kill comes while a multipart upload is open."""
    store = MediaStore(s3_client, bucket=s3_bucket)
    with killed_at_the_end(trial.start("first.log")) as first:
        deadline = time.monotonic() + 60
        while not store.list_open_multipart_uploads():
            assert first.poll() is None, trial.output("first.log")
            assert time.monotonic() < deadline, "no multipart upload was started"
            time.sleep(0.01)
    assert first.returncode == -signal.SIGKILL
    assert store.list_open_multipart_uploads() != []  # the killed run left it open
    statuses = run_statuses(trial)
    assert list(statuses.values()) == ["running"]  # killed mid-work: nobody finished the row
    (killed_running,) = statuses
    second = trial.start("second.log")
    assert second.wait(timeout=90) == 0, trial.output("second.log")
    assert "left open by an earlier run" in trial.output("second.log")
    assert "marked interrupted" in trial.output("second.log")
    assert_archived_exactly_once(trial, s3_client, s3_bucket, killed_running=[killed_running])


#: ``recarchive ARGS`` whose ledger marks wait for the chunk's end (so every transfer finishes
#: first), killed with SIGKILL by the first batch that would mark a recording ``archived``,
#: before that batch reaches the database.
KILLED_BEFORE_MARKS = """
import os, signal, sys
from recarchive.run import marks
from recarchive.store.outcomes import LedgerOutcomes

marks.MAX_PENDING, marks.MAX_WAIT = 1_000_000, 3600.0
apply = LedgerOutcomes.apply_outcomes

def killed_before_the_commit(self, outcomes, *, owner):
    if any(outcome.state == "archived" for outcome in outcomes):
        os.kill(os.getpid(), signal.SIGKILL)
    return apply(self, outcomes, owner=owner)

LedgerOutcomes.apply_outcomes = killed_before_the_commit
from recarchive.cli.app import main
sys.argv[0] = "recarchive"
main()
"""


def test_sigkill_after_uploads_before_their_marks_then_retry_failed_adopts_them(
    trial: Trial, s3_client: S3Client, s3_bucket: str
) -> None:
    """Marks go in batches: a kill loses the batch, never the transfers behind it.

    The killed run uploaded every available recording and marked none. The rerun finds each
    object at the key pinned before its upload — although Bird's ``createdAt`` moved a day
    meanwhile, so the key it would choose now is another — and adopts it after hashing its
    bytes: no second download, one object each, the ledger ``archived`` with the right SHA-256.
    """
    sim = trial.sim
    available = sim.dataset.available_ids()
    log = (trial.workdir / "first.log").open("wb")
    with (
        log,
        killed_at_the_end(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    KILLED_BEFORE_MARKS,
                    "archive",
                    "--ids-file",
                    str(trial.ids_file),
                ],
                env=trial.env,
                cwd=trial.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        ) as first,
    ):
        first.wait(timeout=90)
    assert first.returncode == -signal.SIGKILL, trial.output("first.log")
    # Every transfer finished, no mark reached the ledger; the keys were pinned before.
    assert stored_media_ids(s3_client, s3_bucket) == set(available)
    ledger = ArchiveStore(create_engine_for(trial.env["RECARCHIVE_DATABASE_URL"]))
    try:
        entries = ledger.get_entries(sim.dataset.ids)
    finally:
        ledger.engine.dispose()
    assert {entry.state for entry in entries.values()} == {"pending"}
    pinned = {rid: str(entries[rid].s3_key) for rid in available if entries[rid].s3_key}
    assert len(pinned) == len(available)
    listed = s3_client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])
    assert set(pinned.values()) == {obj["Key"] for obj in listed if obj["Key"].endswith(".mp3")}

    for recording_id in available:  # Bird corrects createdAt by a day: another key now
        payload = sim.dataset.payload(recording_id)
        assert payload is not None
        created = datetime.fromisoformat(payload["createdAt"].replace("Z", "+00:00"))
        moved = (created + timedelta(days=1)).isoformat().replace("+00:00", "Z")
        sim.dataset.touch(recording_id, createdAt=moved)
    sim.clear_requests()
    second = trial.start("second.log", "retry-failed")
    assert second.wait(timeout=90) == 0, trial.output("second.log")

    assert sim.media_requests() == [], "a recording the killed run had stored was downloaded again"
    store = MediaStore(s3_client, bucket=s3_bucket)
    ledger = ArchiveStore(create_engine_for(trial.env["RECARCHIVE_DATABASE_URL"]))
    try:
        entries = ledger.get_entries(sim.dataset.ids)
    finally:
        ledger.engine.dispose()
    versions = Counter(
        version["Key"]
        for version in s3_client.list_object_versions(Bucket=s3_bucket).get("Versions", [])
        if version["Key"].endswith(".mp3")
    )
    assert versions == Counter(pinned.values())  # one version each, at the pinned keys only
    for recording_id, entry in entries.items():
        assert entry.lease_owner is None
        if recording_id not in pinned:
            assert entry.state == "metadata_only", (recording_id, entry.state)
            continue
        expected = sim.dataset.media(recording_id).sha256()
        assert (entry.state, entry.s3_key, entry.sha256) == (
            "archived",
            pinned[recording_id],
            expected,
        )
        assert store.hash_object(pinned[recording_id]) == (entry.size_bytes, expected)
    assert store.list_open_multipart_uploads() == []
    assert list(trial.temp_dir.iterdir()) == []


# --- taking over the leases of dead runs (unit level) ----------------------------------------


def _entry(recording_id: str, owner: str | None) -> LedgerEntry:
    return LedgerEntry(
        recording_id=recording_id,
        state="pending",
        attempts=0,
        last_error=None,
        next_attempt_at=None,
        s3_bucket=None,
        s3_key=None,
        size_bytes=None,
        sha256=None,
        archived_at=None,
        lease_owner=owner,
        lease_expires_at=None,
    )


def test_only_dead_owners_of_this_host_are_taken_over(caplog: pytest.LogCaptureFixture) -> None:
    own = f"host-a:{os.getpid()}:self"
    entries = [
        _entry("r1", "host-a:111:dead"),
        _entry("r2", "host-a:111:dead"),
        _entry("r3", "host-a:222:live"),
        _entry("r4", "host-b:111:elsewhere"),  # same pid number, another host
        _entry("r5", own),
        _entry("r6", f"host-a:{os.getpid()}:sibling"),  # another run in this very process
        _entry("r7", None),
        _entry("r8", "not-an-owner-name"),
        _entry("r9", "host-a:abc:x"),
    ]
    released: list[tuple[list[str], str]] = []

    def release(ids: list[str], *, owner: str) -> None:
        released.append((list(ids), owner))

    # r6: a sibling run open in this very process; r10: one of this process that ended.
    with active_owner(f"host-a:{os.getpid()}:sibling"):
        taken = release_dead_leases(
            [*entries, _entry("r10", f"host-a:{os.getpid()}:ended")],
            release,
            own_owner=own,
            hostname="host-a",
            alive=lambda pid: pid != 111,
        )
    assert taken == {"r1", "r2", "r10"}
    assert released == [(["r1", "r2"], "host-a:111:dead"), (["r10"], f"host-a:{os.getpid()}:ended")]
    assert "took over 2 lease(s) of run host-a:111:dead" in caplog.text


def test_local_owner_dead_needs_a_proven_death_on_this_host() -> None:
    def alive(pid: int) -> bool:
        return pid == 20

    assert local_owner_dead("box:10:ab12", hostname="box", alive=alive)
    assert not local_owner_dead("box:20:ab12", hostname="box", alive=alive)
    assert not local_owner_dead("other:10:ab12", hostname="box", alive=alive)
    assert not local_owner_dead("not-an-owner", hostname="box", alive=alive)


def test_pid_alive_tells_a_reaped_child_from_a_running_one() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert pid_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not pid_alive(child.pid)
    assert pid_alive(os.getpid())
    assert owner_pid_on_host(f"{socket.gethostname()}:{child.pid}:x", socket.gethostname()) == (
        child.pid
    )


def test_rerun_takes_over_a_dead_runs_leases_at_once(tmp_path: Path) -> None:
    store = ArchiveStore(create_engine_for(f"sqlite:///{tmp_path / 'ledger.db'}"))
    upgrade_database(store.engine)
    try:
        ids = ["00000000-0000-4000-8000-000000000001", "00000000-0000-4000-8000-000000000002"]
        store.register(ids)
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        host = socket.gethostname()
        dead_owner = f"{host}:{child.pid}:dead"
        live_owner = f"{host}:{os.getppid()}:live"  # our parent process is alive
        assert store.claim(ids[:1], owner=dead_owner, lease_seconds=900, states={"pending"})
        assert store.claim(ids[1:], owner=live_owner, lease_seconds=900, states={"pending"})
        me = f"{host}:{os.getpid()}:rerun"
        assert store.claim(ids, owner=me, lease_seconds=900, states={"pending"}) == []
        taken = release_dead_leases(store.get_entries(ids).values(), store.release, own_owner=me)
        assert taken == {ids[0]}
        assert store.claim(ids, owner=me, lease_seconds=900, states={"pending"}) == ids[:1]
        assert store.get_entries(ids)[ids[1]].lease_owner == live_owner
    finally:
        store.engine.dispose()
