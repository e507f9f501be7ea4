"""``recarchive erase`` end to end: the simulator, moto's S3 server with Object Lock, SQLite.

Retention and legal holds are set on the objects directly with boto3, as an operator (or
the archive's lock settings) would; ``erase`` must refuse what S3 would refuse, delete nothing
of a refused recording, and remove every version of everything else.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError
from sqlalchemy import func, select, text, update
from typer.testing import CliRunner, Result

from recarchive.cli.app import app
from recarchive.media.keys import object_prefix, sidecar_key, tombstone_key
from recarchive.model import CLAIMABLE_STATES, LEDGER_STATES, skip_counter
from recarchive.normalize import normalize_recording
from recarchive.simulator.server import SimulatorServer
from recarchive.store.archive import ArchiveStore
from recarchive.store.engine import create_engine_for
from recarchive.store.erasures import ErasureOutcome, ErasureRequest
from recarchive.store.tables import archive_ledger, recording_parties, recordings
from tests.fixtures.simulator import SimulatorFactory
from tests.test_normalize import make_payload

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

Invoke = Callable[..., Result]
SEVEN_YEARS = timedelta(days=7 * 365 + 2)


@dataclass
class Archive:
    """20 recordings archived into a lock-enabled bucket, and how to reach everything."""

    sim: SimulatorServer
    env: dict[str, str]
    s3: S3Client
    bucket: str
    ids: list[str]

    def invoke(self, *args: str, **extra: str) -> Result:
        full = {
            **self.env,
            "RECARCHIVE_BIRD_API_URL": self.sim.api_url,
            "RECARCHIVE_BIRD_ACCESS_KEY": self.sim.config.access_key,
            "RECARCHIVE_WORKSPACE_ID": self.sim.config.workspace_id,
            **extra,
        }
        return CliRunner().invoke(app, list(args), env=full, catch_exceptions=False)

    def erase(self, *args: str) -> tuple[int, dict[str, dict[str, Any]]]:
        result = self.invoke("erase", "--json", "--reason", "GDPR request 42", *args)
        start = result.stdout.find("[")
        doc = json.loads(result.stdout[start:]) if start >= 0 else []
        return result.exit_code, {item["id"]: item for item in doc}

    def store(self) -> ArchiveStore:
        return ArchiveStore(create_engine_for(self.env["RECARCHIVE_DATABASE_URL"]))

    def key(self, recording_id: str) -> str:
        key = self.store().get_entries([recording_id])[recording_id].s3_key
        assert key is not None
        return key

    def versions(self, recording_id: str) -> list[tuple[str, str, bool]]:
        """(key, version, delete marker) of every version of the recording's objects."""
        answer = self.s3.list_object_versions(
            Bucket=self.bucket, Prefix=object_prefix(self.key(recording_id))
        )
        found = [(v["Key"], v["VersionId"], False) for v in answer.get("Versions", [])]
        found += [(m["Key"], m["VersionId"], True) for m in answer.get("DeleteMarkers", [])]
        return sorted(found)

    def sql_rows(self, recording_id: str) -> int:
        with self.store().engine.connect() as connection:
            one = connection.execute(
                select(func.count()).where(recordings.c.id == recording_id)
            ).scalar_one()
            two = connection.execute(
                select(func.count()).where(recording_parties.c.recording_id == recording_id)
            ).scalar_one()
        return int(one) + int(two)

    def parquet_ids(self) -> set[str]:
        result = self.invoke("query", "--json", "select id from recordings")
        assert result.exit_code == 0, result.output
        return {row["id"] for row in json.loads(result.stdout)}

    def created_at(self, recording_id: str) -> datetime:
        payload = self.sim.dataset.payload(recording_id)
        assert payload is not None
        return datetime.fromisoformat(payload["createdAt"].replace("Z", "+00:00"))

    def asked_about(self, ids: set[str]) -> list[str]:
        """API and media requests that named one of ``ids``."""
        return [r.path for r in self.sim.requests if any(rid in r.path for rid in ids)]


@pytest.fixture
def archive(
    simulator_factory: SimulatorFactory, s3_client: S3Client, tmp_path: Path, s3_endpoint: str
) -> Archive:
    bucket = f"recarchive-erase-{os.getpid()}-{tmp_path.name[-12:].lower().strip('_')}"
    bucket = bucket.replace("_", "-")[:63]
    s3_client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    sim = simulator_factory(recordings=20, seed=14, available_fraction=1.0)
    env = {
        "RECARCHIVE_DATABASE_URL": f"sqlite:///{tmp_path / 'archive.db'}",
        "RECARCHIVE_PARQUET_ROOT": str(tmp_path / "parquet"),
        "RECARCHIVE_S3_BUCKET": bucket,
        "RECARCHIVE_S3_ENDPOINT_URL": s3_endpoint,
        "RECARCHIVE_REQUESTS_PER_SECOND": "1000",
    }
    setup = Archive(sim, env, s3_client, bucket, list(sim.dataset.ids))
    result = setup.invoke("archive", *setup.ids)
    assert result.exit_code == 0, result.output
    return setup


def add_versions(archive: Archive, recording_id: str) -> None:
    """A second sidecar version, a transcription, and a delete marker over a deleted one."""
    key = archive.key(recording_id)
    stem = key.removesuffix(".mp3")
    s3, bucket = archive.s3, archive.bucket
    s3.put_object(Bucket=bucket, Key=sidecar_key(key), Body=b'{"id": "v2"}')
    s3.put_object(Bucket=bucket, Key=f"{stem}.transcription.t1.json", Body=b"{}")
    s3.put_object(Bucket=bucket, Key=f"{stem}.transcription.t1.txt", Body=b"hello")
    s3.delete_object(Bucket=bucket, Key=f"{stem}.transcription.t1.txt")  # a delete marker


# --- locks ---------------------------------------------------------------------------------


def _mp3_version(archive: Archive, recording_id: str) -> tuple[str, str]:
    key = archive.key(recording_id)
    (version,) = [v for k, v, marker in archive.versions(recording_id) if k == key]
    return key, version


def retain(mode: str) -> Callable[[Archive, str], str]:
    def apply(archive: Archive, recording_id: str) -> str:
        key, version = _mp3_version(archive, recording_id)
        until = archive.created_at(recording_id) + SEVEN_YEARS
        archive.s3.put_object_retention(
            Bucket=archive.bucket,
            Key=key,
            VersionId=version,
            Retention={
                "Mode": "COMPLIANCE" if mode == "COMPLIANCE" else "GOVERNANCE",
                "RetainUntilDate": until,
            },
        )
        return until.date().isoformat()

    return apply


def retain_old_sidecar(archive: Archive, recording_id: str) -> str:
    """GOVERNANCE on the older (noncurrent) sidecar version: every version is checked."""
    sidecar = sidecar_key(archive.key(recording_id))
    versions = archive.s3.list_object_versions(Bucket=archive.bucket, Prefix=sidecar)["Versions"]
    (old,) = [v for v in versions if not v["IsLatest"]]
    until = datetime.now(UTC) + timedelta(days=30)
    archive.s3.put_object_retention(
        Bucket=archive.bucket,
        Key=sidecar,
        VersionId=old["VersionId"],
        Retention={"Mode": "GOVERNANCE", "RetainUntilDate": until},
    )
    return until.date().isoformat()


def legal_hold(archive: Archive, recording_id: str) -> str:
    key, version = _mp3_version(archive, recording_id)
    archive.s3.put_object_legal_hold(
        Bucket=archive.bucket, Key=key, VersionId=version, LegalHold={"Status": "ON"}
    )
    return "legal hold"


def no_lock(archive: Archive, recording_id: str) -> str:
    return ""


@dataclass(frozen=True)
class LockCase:
    lock: Callable[[Archive, str], str]  # returns what the refusal must name
    flags: tuple[str, ...]
    refused: str | None  # a word the refusal says; None: erased


LOCK_CASES = {
    "no-lock": LockCase(no_lock, (), None),
    "compliance-refused-with-the-date": LockCase(retain("COMPLIANCE"), (), "COMPLIANCE"),
    "compliance-bypass-does-not-help": LockCase(
        retain("COMPLIANCE"), ("--bypass-governance",), "COMPLIANCE"
    ),
    "governance-without-bypass": LockCase(retain("GOVERNANCE"), (), "--bypass-governance"),
    "governance-on-an-old-version": LockCase(retain_old_sidecar, (), "--bypass-governance"),
    "governance-with-bypass": LockCase(retain("GOVERNANCE"), ("--bypass-governance",), None),
    "old-governance-with-bypass": LockCase(retain_old_sidecar, ("--bypass-governance",), None),
    "legal-hold": LockCase(legal_hold, ("--bypass-governance",), "legal hold"),
}


@pytest.mark.parametrize("name", list(LOCK_CASES), ids=list(LOCK_CASES))
def test_erase_refuses_what_s3_would_refuse_and_erases_the_rest(
    archive: Archive, name: str
) -> None:
    case = LOCK_CASES[name]
    victim, bystander = archive.ids[0], archive.ids[1]
    for recording_id in (victim, bystander):
        add_versions(archive, recording_id)
    named = case.lock(archive, victim)
    before = archive.versions(victim)
    assert len(before) == 6  # mp3, 2 sidecars, transcription, a txt version and its marker
    rows_before = archive.sql_rows(victim)

    code, results = archive.erase(victim, bystander, *case.flags)

    # The other recording of the command is erased whatever happens to the first.
    assert results[bystander]["result"] == "erased", results
    assert [key for key, _, _ in archive.versions(bystander)] == [
        tombstone_key(archive.key(bystander))
    ]
    entries = archive.store().get_entries([victim, bystander])
    assert entries[bystander].state == "erased"
    if case.refused is not None:
        assert code == 1
        assert results[victim]["result"] == "refused"
        assert case.refused in results[victim]["message"]
        assert named in results[victim]["message"]
        assert archive.versions(victim) == before  # nothing deleted, no tombstone
        assert archive.sql_rows(victim) == rows_before
        assert entries[victim].state == "archived" and entries[victim].lease_owner is None
        assert victim in archive.parquet_ids()
        (row,) = archive.store().erasure_log(victim)
        assert row.outcome == "refused" and case.refused in (row.detail or "")
    else:
        assert code == 0
        assert results[victim]["result"] == "erased"
        assert archive.sql_rows(victim) == 0
        assert entries[victim].state == "erased"
        (row,) = archive.store().erasure_log(victim)
        assert row.outcome == "erased" and row.s3_versions_deleted == len(before)
    assert bystander not in archive.parquet_ids()


def test_moto_enforces_compliance_and_legal_holds_on_versions(archive: Archive) -> None:
    # What the refusals above rely on, shown on the server itself: deleting a version under
    # COMPLIANCE fails, even with the governance bypass; so does one under a legal hold.

    retain("COMPLIANCE")(archive, archive.ids[2])
    legal_hold(archive, archive.ids[3])
    for recording_id in archive.ids[2:4]:
        key, version = _mp3_version(archive, recording_id)
        with pytest.raises(ClientError):
            archive.s3.delete_object(
                Bucket=archive.bucket, Key=key, VersionId=version, BypassGovernanceRetention=True
            )


# --- everywhere, and never again ----------------------------------------------------------


def test_erase_removes_everything_and_leaves_tombstones(archive: Archive) -> None:
    victims = archive.ids[:3]
    for recording_id in victims:
        add_versions(archive, recording_id)
    assert set(victims) <= archive.parquet_ids()

    code, results = archive.erase(*victims, "--at-source")
    assert code == 0, results
    assert {results[rid]["result"] for rid in victims} == {"erased"}
    store = archive.store()
    for recording_id in victims:
        key = archive.key(recording_id)
        (only,) = archive.versions(recording_id)
        assert only[0] == tombstone_key(key)
        tomb = json.loads(
            archive.s3.get_object(Bucket=archive.bucket, Key=tombstone_key(key))["Body"].read()
        )
        assert tomb["recordingId"] == recording_id and tomb["reason"] == "GDPR request 42"
        assert set(tomb) == {"recordingId", "state", "erasedAt", "reason", "erasure"}
        entry = store.get_entries([recording_id])[recording_id]
        assert entry.state == "erased" and entry.sha256 is None and entry.size_bytes is None
        assert entry.last_error == "erased on request: GDPR request 42"
        assert archive.sql_rows(recording_id) == 0
        assert archive.sim.dataset.is_deleted(recording_id)  # --at-source
        (row,) = store.erasure_log(recording_id)
        assert row.outcome == "erased" and row.at_source and row.sql_rows_deleted >= 1
        assert row.s3_versions_deleted == 6 and row.finished_at is not None
        assert row.created_month is not None and row.requested_by
    assert row.parquet_partitions_rewritten == 1
    assert archive.parquet_ids() == set(archive.ids) - set(victims)
    status = json.loads(archive.invoke("status", "--json").stdout)
    assert status["states"]["erased"] == 3 and status["states"]["archived"] == 17
    assert status["erasures"] == {"erasing": 0, "erased": 3, "refused": 0}
    shown = archive.invoke("status").stdout
    assert "erased" in shown and "Erasures" in shown

    # Again: reported as already erased, exit 0, nothing asked anywhere.
    archive.sim.clear_requests()
    code, again = archive.erase(*victims)
    assert code == 0 and {again[rid]["result"] for rid in victims} == {"already_erased"}
    assert archive.sim.requests == []


def test_unknown_ids_are_reported_and_fail_the_command(archive: Archive) -> None:
    unknown = "00000000-0000-4000-8000-000000000014"
    code, results = archive.erase(unknown, archive.ids[0])
    assert code == 1
    assert results[unknown]["result"] == "unknown"
    assert "not in the ledger" in results[unknown]["message"]
    assert results[archive.ids[0]]["result"] == "erased"
    bad = archive.invoke("erase", "--reason", "x", "not-an-id")
    assert bad.exit_code == 2
    blank = archive.invoke("erase", "--reason", "  ", archive.ids[1])
    assert blank.exit_code == 2


def test_later_runs_windows_refreshes_and_retries_never_ask_for_erased_ids(
    archive: Archive,
) -> None:
    erased, kept_failed = archive.ids[:2], archive.ids[2]
    store = archive.store()
    # Both due for a retry: one is erased, the other shows retry-failed does retry.
    with store.engine.begin() as connection:
        connection.execute(
            update(archive_ledger)
            .where(archive_ledger.c.recording_id.in_([erased[0], kept_failed]))
            .values(
                state="failed",
                attempts=1,
                next_attempt_at=datetime.now(UTC) - timedelta(hours=1),
                last_error="test",
            )
        )
    code, _ = archive.erase(*erased)
    assert code == 0
    targets = set(erased)
    checks: list[tuple[str, ...]] = [
        ("retry-failed",),  # first: an archive of the IDs would retry the failed one itself
        ("archive", *archive.ids),
        ("archive", "--refresh", *archive.ids),
        ("archive", "--since", "2024-01-01", "--until", "2027-01-01"),
        ("archive", "--since", "2024-01-01", "--until", "2027-01-01", "--refresh"),
    ]
    for args in checks:
        archive.sim.clear_requests()
        result = archive.invoke(*args)
        assert result.exit_code == 0, (args, result.output)
        assert archive.asked_about(targets) == [], args
        if args[0] == "retry-failed":
            assert archive.asked_about({kept_failed}), "retry-failed retried nothing"
        elif "--refresh" in args:
            assert archive.asked_about(set(archive.ids[2:])), args  # the others were fetched
    entries = store.get_entries(erased)
    assert {entry.state for entry in entries.values()} == {"erased"}
    assert all(archive.versions(rid)[0][0].endswith(".erased.json") for rid in erased)
    runs = json.loads(archive.invoke("status", "--json").stdout)["runs"]
    assert any(run.get("erased") == 2 for run in runs)


# --- crash safety ---------------------------------------------------------------------------

_KILL_AFTER_FIRST_DELETE = textwrap.dedent(
    """
    import os, sys
    from recarchive.media import versions

    real = versions.ObjectVersions.delete

    def delete_then_die(self, version, **kwargs):
        real(self, version, **kwargs)
        os._exit(137)  # no cleanup at all: like SIGKILL

    versions.ObjectVersions.delete = delete_then_die
    from recarchive.cli.app import main

    sys.argv = ["recarchive", "erase", "--reason", "GDPR request 42", *sys.argv[1:]]
    main()
    """
)


def test_an_erase_killed_half_way_resumes_when_run_again(archive: Archive) -> None:
    victim = archive.ids[0]
    add_versions(archive, victim)
    before = len(archive.versions(victim))
    env = {
        **os.environ,
        **archive.env,
        "RECARCHIVE_BIRD_API_URL": archive.sim.api_url,
        "RECARCHIVE_BIRD_ACCESS_KEY": archive.sim.config.access_key,
        "RECARCHIVE_WORKSPACE_ID": archive.sim.config.workspace_id,
    }
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_AFTER_FIRST_DELETE, victim],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert killed.returncode == 137, killed.stderr.decode()
    store = archive.store()
    assert store.get_entries([victim])[victim].state == "erased"  # the tombstone came first
    assert archive.sql_rows(victim) == 0
    (row,) = store.erasure_log(victim)
    assert row.outcome == "erasing"
    left = archive.versions(victim)
    assert len(left) == before  # one deleted, the tombstone written
    assert victim in archive.parquet_ids()  # the Parquet step had not run

    archive.sim.clear_requests()
    code, results = archive.erase(victim)
    assert code == 0 and results[victim]["result"] == "erased", results
    assert [key for key, _, _ in archive.versions(victim)] == [tombstone_key(archive.key(victim))]
    (row,) = store.erasure_log(victim)
    # The killed attempt died before recording its one deletion; the resumed one counts its 5.
    assert row.outcome == "erased" and row.s3_versions_deleted == before - 1
    assert victim not in archive.parquet_ids()
    assert archive.sim.requests == []  # a tombstone is never fetched, not even to resume


# --- Parquet on a versioned bucket ----------------------------------------------------------


def test_older_versions_of_rewritten_partitions_are_deleted_on_a_versioned_root(
    archive: Archive,
) -> None:
    root_bucket = f"{archive.bucket[:50]}-pq"
    archive.s3.create_bucket(Bucket=root_bucket)
    archive.s3.put_bucket_versioning(
        Bucket=root_bucket, VersioningConfiguration={"Status": "Enabled"}
    )
    archive.env["RECARCHIVE_PARQUET_ROOT"] = f"s3://{root_bucket}/dataset"
    assert archive.invoke("export", "--full").exit_code == 0
    victim = archive.ids[0]
    # Change a neighbour in the victim's month so its partition gets a second version.
    store = archive.store()
    with store.engine.begin() as connection:
        month = connection.execute(
            select(recordings.c.created_month).where(recordings.c.id == victim)
        ).scalar_one()
        connection.execute(text("UPDATE recordings SET duration = duration + 1"))
        connection.execute(
            text("UPDATE export_partitions SET version = version + 1 WHERE created_month = :m"),
            {"m": month},
        )
    assert archive.invoke("export").exit_code == 0
    folder = f"dataset/recordings/created_month={month}/"

    def bodies() -> Iterator[bytes]:
        answer = archive.s3.list_object_versions(Bucket=root_bucket, Prefix=folder)
        for version in answer.get("Versions", []):
            yield archive.s3.get_object(
                Bucket=root_bucket, Key=version["Key"], VersionId=version["VersionId"]
            )["Body"].read()

    assert len(list(bodies())) == 2
    code, results = archive.erase(victim)
    assert code == 0, results
    kept = list(bodies())
    assert len(kept) == 1  # only the current file
    ids = set(pq.read_table(io.BytesIO(kept[0])).column("id").to_pylist())
    assert victim not in ids and ids
    (row,) = archive.store().erasure_log(victim)
    assert row.parquet_versions_deleted >= 2  # recordings and recording_parties, old versions


# --- the store: one transaction, and no lease ever again ------------------------------------


def test_begin_erasure_is_one_transaction_and_erased_rows_are_never_leased(
    store: ArchiveStore,
) -> None:
    fetched = datetime(2026, 12, 1, tzinfo=UTC)
    records = [
        normalize_recording(make_payload(index), workspace_id="ws", fetched_at=fetched)
        for index in range(2)
    ]
    store.save_metadata(records)
    victim, other = records[0].id, records[1].id
    store.register([victim, other])
    assert (
        store.begin_erasure(ErasureRequest(victim, "r", "u", "someone", at_source=False)) is None
    )  # without the lease: nothing changes
    assert store.get_entries([victim])[victim].state == "pending"
    assert store.claim([victim], owner="eraser", lease_seconds=60, states=CLAIMABLE_STATES)
    record = store.begin_erasure(ErasureRequest(victim, "r", "u", "eraser", at_source=True))
    assert record is not None and record.outcome == "erasing" and record.sql_rows_deleted >= 1
    assert record.created_month == records[0].recording["created_month"]
    entry = store.get_entries([victim])[victim]
    assert entry.state == "erased" and entry.lease_owner is None
    with store.engine.connect() as connection:
        assert (
            connection.execute(select(func.count()).where(recordings.c.id == victim)).scalar_one()
            == 0
        )
        assert (
            connection.execute(select(func.count()).where(recordings.c.id == other)).scalar_one()
            == 1
        )
    # Whatever states a caller asks for, an erased row is not leased; the other one is.
    claimed = store.claim(
        [victim, other], owner="run", lease_seconds=60, states=list(LEDGER_STATES)
    )
    assert claimed == [other]
    assert victim not in store.due_retries(limit=10, max_attempts=8)  # erased is never due
    assert store.begin_erasure(ErasureRequest(victim, "r", "u", "eraser", at_source=False)) is None
    store.finish_erasure(record.id, outcome=ErasureOutcome.ERASED, s3_versions_deleted=2)
    store.finish_erasure(record.id, outcome=ErasureOutcome.ERASED, s3_versions_deleted=1)
    (done,) = store.erasure_log(victim)
    assert done.s3_versions_deleted == 3 and done.finished_at is not None and done.at_source
    assert store.erasure_counts() == {"erasing": 0, "erased": 1, "refused": 0}
    assert store.counts()["erased"] == 1


@pytest.mark.parametrize(
    ("state", "refresh", "counter"),
    [
        ("archived", False, "already_archived"),
        ("archived", True, None),
        ("missing", False, "missing"),
        ("missing", True, None),
        ("erased", False, "erased"),
        ("erased", True, "erased"),
        ("failed", False, None),
        ("pending", True, None),
    ],
    ids=lambda value: str(value),
)
def test_which_states_a_run_skips_without_a_request(
    state: str, refresh: bool, counter: str | None
) -> None:
    assert skip_counter(state, refresh=refresh) == counter


# --- the end-to-end case ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["COMPLIANCE", "GOVERNANCE"])
def test_twenty_recordings_archived_under_a_lock_setting_then_erased_or_refused(
    simulator_factory: SimulatorFactory,
    s3_client: S3Client,
    tmp_path: Path,
    s3_endpoint: str,
    mode: str,
) -> None:
    # The case end to end, the lock written by recarchive itself from its settings
    # (RECARCHIVE_S3_OBJECT_LOCK_MODE, RECARCHIVE_S3_RETENTION_DAYS = 7 years from createdAt).
    bucket = f"recarchive-lock-e2e-{os.getpid()}-{mode.lower()}"
    s3_client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    sim = simulator_factory(recordings=20, seed=15, available_fraction=1.0)
    env = {
        "RECARCHIVE_DATABASE_URL": f"sqlite:///{tmp_path / 'archive.db'}",
        "RECARCHIVE_PARQUET_ROOT": str(tmp_path / "parquet"),
        "RECARCHIVE_S3_BUCKET": bucket,
        "RECARCHIVE_S3_ENDPOINT_URL": s3_endpoint,
        "RECARCHIVE_REQUESTS_PER_SECOND": "1000",
        "RECARCHIVE_S3_OBJECT_LOCK_MODE": mode,
        "RECARCHIVE_S3_RETENTION_DAYS": str(7 * 365 + 2),
    }
    archive = Archive(sim, env, s3_client, bucket, list(sim.dataset.ids))
    first = archive.invoke("archive", *archive.ids)
    assert first.exit_code == 0, first.output
    dates = {}
    for recording_id in archive.ids:
        until = archive.created_at(recording_id) + SEVEN_YEARS
        dates[recording_id] = until.date().isoformat()
        versions = archive.versions(recording_id)
        assert len(versions) == 2  # the MP3 and its sidecar
        for key, version, _marker in versions:
            head = s3_client.head_object(Bucket=bucket, Key=key, VersionId=version)
            assert head["ObjectLockMode"] == mode
            assert head["ObjectLockRetainUntilDate"].date().isoformat() == dates[recording_id]
            with pytest.raises(ClientError):  # deleting any version fails
                s3_client.delete_object(Bucket=bucket, Key=key, VersionId=version)
    before = {rid: archive.versions(rid) for rid in archive.ids}

    code, results = archive.erase(*archive.ids)
    assert code == 1
    for recording_id in archive.ids:
        assert results[recording_id]["result"] == "refused"
        assert dates[recording_id] in results[recording_id]["message"]
    assert {rid: archive.versions(rid) for rid in archive.ids} == before
    assert archive.parquet_ids() == set(archive.ids)

    code, results = archive.erase(*archive.ids, "--bypass-governance")
    if mode == "COMPLIANCE":
        assert code == 1 and {r["result"] for r in results.values()} == {"refused"}
        assert {rid: archive.versions(rid) for rid in archive.ids} == before
        return
    assert code == 0, results
    for recording_id in archive.ids:
        remaining = [key for key, _, _ in archive.versions(recording_id)]
        assert remaining == [tombstone_key(archive.key(recording_id))]
        assert archive.sql_rows(recording_id) == 0
    assert archive.parquet_ids() == set()
    sim.clear_requests()
    again = archive.invoke("archive", *archive.ids)
    assert again.exit_code == 0, again.output
    assert sim.requests == []
