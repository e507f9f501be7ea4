"""Retention locks, storage classes, legal holds and restores (issue 14, part 1), on moto.

Everything runs as a user would run it: the ``recarchive`` command with the contract's
environment, the Bird simulator, moto's S3 server (through the fault proxy, which records every
request) and SQLite. Object Lock needs a bucket created with it (``lock_bucket``).

What moto does not enforce, and these tests therefore cannot show: it ignores the retention
and storage class given to ``CreateMultipartUpload`` (``MediaStore.verify_stored`` then sets
the retention with ``PutObjectRetention``; the request is still checked here), it has no
``GetObjectRetention`` (the HEAD of each version shows mode and date instead), and it lets
``PutObjectRetention`` shorten a ``COMPLIANCE`` retention.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from botocore.exceptions import ClientError
from sqlalchemy import select
from typer.testing import CliRunner, Result

from recarchive.cli.app import app
from recarchive.config import load_settings
from recarchive.errors import ConfigError
from recarchive.media.keys import media_key, sidecar_key
from recarchive.media.locks import RESTORE_DAYS, RetentionPolicy
from recarchive.normalize import normalize_recording
from recarchive.simulator.server import SimulatorServer
from recarchive.store.archive import ArchiveStore
from recarchive.store.engine import create_engine_for
from recarchive.store.outcomes import Outcome
from recarchive.store.tables import archive_ledger
from tests.fixtures.s3_proxy import FaultProxy
from tests.fixtures.simulator import SimulatorFactory
from tests.test_normalize import make_payload

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

Invoke = Callable[..., Result]
PREFIX = "recordings"
#: Seven years, leap days included: the MiFID II term.
SEVEN_YEARS = 2557
_numbers = itertools.count()


@pytest.fixture
def lock_bucket(s3_client: S3Client) -> str:
    """A fresh bucket created with Object Lock (and so versioning) enabled."""
    name = f"recarchive-lock-{os.getpid()}-{next(_numbers)}"
    s3_client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    return name


@pytest.fixture
def env(tmp_path: Path, s3_fault_proxy: FaultProxy) -> dict[str, str]:
    return {
        "RECARCHIVE_DATABASE_URL": f"sqlite:///{tmp_path / 'archive.db'}",
        "RECARCHIVE_PARQUET_ROOT": str(tmp_path / "parquet"),
        "RECARCHIVE_S3_ENDPOINT_URL": s3_fault_proxy.url,
        "RECARCHIVE_REQUESTS_PER_SECOND": "1000",
    }


@pytest.fixture
def invoke(env: dict[str, str]) -> Invoke:
    def run(*args: str, sim: SimulatorServer | None = None, **extra: str) -> Result:
        bird = (
            {
                "RECARCHIVE_BIRD_API_URL": sim.api_url,
                "RECARCHIVE_BIRD_ACCESS_KEY": sim.config.access_key,
                "RECARCHIVE_WORKSPACE_ID": sim.config.workspace_id,
            }
            if sim
            else {}
        )
        full = {**env, **bird, **extra}
        return CliRunner().invoke(app, list(args), env=full, catch_exceptions=False)

    return run


def created_of(sim: SimulatorServer, recording_id: str) -> datetime:
    payload = sim.dataset.payload(recording_id)
    assert payload is not None
    return datetime.fromisoformat(payload["createdAt"].replace("Z", "+00:00"))


def key_of(sim: SimulatorServer, recording_id: str) -> str:
    return media_key(PREFIX, sim.config.workspace_id, recording_id, created_of(sim, recording_id))


def expected_until(created: datetime, days: int) -> datetime:
    until = created + timedelta(days=days)
    return until.replace(microsecond=0) + timedelta(seconds=1) if until.microsecond else until


def versions(s3: S3Client, bucket: str, key: str) -> list[str]:
    listed = s3.list_object_versions(Bucket=bucket, Prefix=key).get("Versions", [])
    return [str(v["VersionId"]) for v in listed if v["Key"] == key]


def ledger_locks(env: dict[str, str]) -> dict[str, tuple[Any, ...]]:
    """``(lock_mode, retain_until, legal_hold)`` of every ledger row, by recording."""
    ledger = archive_ledger.c
    engine = create_engine_for(env["RECARCHIVE_DATABASE_URL"])
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                select(
                    ledger.recording_id, ledger.lock_mode, ledger.retain_until, ledger.legal_hold
                )
            )
            return {row[0]: tuple(row[1:]) for row in rows}
    finally:
        engine.dispose()


def status_locks(invoke: Invoke) -> dict[str, int]:
    result = invoke("status", "--json")
    assert result.exit_code == 0, result.output
    locks: dict[str, int] = json.loads(result.output)["object_lock"]
    return locks


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("RECARCHIVE_"):
            monkeypatch.delenv(name)
    yield


# --- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"RECARCHIVE_S3_OBJECT_LOCK_MODE": "COMPLIANCE"}, "RECARCHIVE_S3_RETENTION_DAYS is not"),
        ({"RECARCHIVE_S3_RETENTION_DAYS": "30"}, "RECARCHIVE_S3_OBJECT_LOCK_MODE is not"),
        (
            {"RECARCHIVE_S3_OBJECT_LOCK_MODE": "STRICT", "RECARCHIVE_S3_RETENTION_DAYS": "1"},
            "RECARCHIVE_S3_OBJECT_LOCK_MODE",
        ),
        (
            {"RECARCHIVE_S3_OBJECT_LOCK_MODE": "GOVERNANCE", "RECARCHIVE_S3_RETENTION_DAYS": "0"},
            "RECARCHIVE_S3_RETENTION_DAYS",
        ),
        ({"RECARCHIVE_S3_STORAGE_CLASS": "GLACIER_FAST"}, "RECARCHIVE_S3_STORAGE_CLASS"),
    ],
    ids=["mode-without-days", "days-without-mode", "bad-mode", "zero-days", "bad-class"],
)
def test_bad_lock_settings_are_refused(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], message: str
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        load_settings()


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({}, (None, None, None)),
        (
            {
                "RECARCHIVE_S3_OBJECT_LOCK_MODE": "",
                "RECARCHIVE_S3_RETENTION_DAYS": "",
                "RECARCHIVE_S3_STORAGE_CLASS": "",
            },
            (None, None, None),
        ),
        (
            {
                "RECARCHIVE_S3_OBJECT_LOCK_MODE": "COMPLIANCE",
                "RECARCHIVE_S3_RETENTION_DAYS": "2557",
                "RECARCHIVE_S3_STORAGE_CLASS": "DEEP_ARCHIVE",
            },
            ("COMPLIANCE", 2557, "DEEP_ARCHIVE"),
        ),
    ],
    ids=["unset", "empty-is-unset", "all-set"],
)
def test_lock_settings_are_read(
    clean_env: None,
    monkeypatch: pytest.MonkeyPatch,
    variables: dict[str, str],
    expected: tuple[Any, ...],
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    found = (settings.s3_object_lock_mode, settings.s3_retention_days, settings.s3_storage_class)
    assert found == expected


def test_bad_lock_setting_is_exit_2_before_any_request(
    simulator_factory: SimulatorFactory,
    invoke: Invoke,
    lock_bucket: str,
    s3_fault_proxy: FaultProxy,
) -> None:
    sim = simulator_factory(recordings=3, seed=3, available_fraction=1.0)
    result = invoke(
        "archive",
        *sim.dataset.ids,
        sim=sim,
        RECARCHIVE_S3_BUCKET=lock_bucket,
        RECARCHIVE_S3_OBJECT_LOCK_MODE="COMPLIANCE",
    )
    assert result.exit_code == 2
    assert "RECARCHIVE_S3_RETENTION_DAYS" in result.output
    assert sim.requests == [] and s3_fault_proxy.log == []


NOW = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("policy", "created", "mode", "until"),
    [
        (RetentionPolicy(), NOW, None, None),
        (
            RetentionPolicy("COMPLIANCE", 10),
            NOW - timedelta(days=3),
            "COMPLIANCE",
            NOW + timedelta(days=7),
        ),
        # createdAt + days already passed: no retention, but the date is kept for the ledger.
        (RetentionPolicy("GOVERNANCE", 10), NOW - timedelta(days=11), None, NOW - timedelta(1)),
        # Rounded up to whole seconds, never shorter than the rule.
        (
            RetentionPolicy("GOVERNANCE", 1),
            NOW + timedelta(milliseconds=250),
            "GOVERNANCE",
            NOW + timedelta(days=1, seconds=1),
        ),
    ],
    ids=["no-mode", "future", "passed", "rounded-up"],
)
def test_retention_is_created_at_plus_days(
    policy: RetentionPolicy, created: datetime, mode: str | None, until: datetime | None
) -> None:
    retention = policy.for_created(created, now=NOW)
    assert (retention.mode, retention.retain_until) == (mode, until)
    assert bool(retention.put_args()) == (mode is not None)


# --- archive under a lock ------------------------------------------------------------------


def test_compliance_archive_locks_every_version_from_created_at(
    simulator_factory: SimulatorFactory,
    invoke: Invoke,
    env: dict[str, str],
    lock_bucket: str,
    s3_client: S3Client,
    s3_fault_proxy: FaultProxy,
) -> None:
    sim = simulator_factory(recordings=21, seed=14, available_fraction=1.0)
    ids = sim.dataset.ids
    old = ids[0]
    # A backfilled call from 2018: seven years from its createdAt are over.
    sim.dataset.touch(old, createdAt="2018-02-03T04:05:06.789Z")
    settings = {
        "RECARCHIVE_S3_BUCKET": lock_bucket,
        "RECARCHIVE_S3_OBJECT_LOCK_MODE": "COMPLIANCE",
        "RECARCHIVE_S3_RETENTION_DAYS": str(SEVEN_YEARS),
        "RECARCHIVE_S3_STORAGE_CLASS": "STANDARD_IA",
    }
    result = invoke("archive", *ids, sim=sim, **settings)
    assert result.exit_code == 0, result.output
    # The lock and the class ride on the writes themselves: per recording still one PUT of
    # the MP3, its read-back HEAD and one PUT of the sidecar; per run one lock check.
    asked = Counter(
        (info.method, info.target.split("?")[0].rsplit(".", 1)[-1])
        for info, _ in s3_fault_proxy.log
    )
    assert asked == {
        ("PUT", "mp3"): 21,
        ("HEAD", "mp3"): 21,
        ("PUT", "json"): 21,
        ("GET", f"/{lock_bucket}"): 1,  # ?object-lock
    }
    ledger = ledger_locks(env)
    for recording_id in ids:
        key = key_of(sim, recording_id)
        until = expected_until(created_of(sim, recording_id), SEVEN_YEARS)
        mp3 = s3_client.head_object(Bucket=lock_bucket, Key=key)
        sidecar = s3_client.head_object(Bucket=lock_bucket, Key=sidecar_key(key))
        # The storage class is the MP3's only: rebuild reads sidecars.
        assert mp3.get("StorageClass") == "STANDARD_IA"
        assert sidecar.get("StorageClass") in (None, "STANDARD")
        if recording_id == old:
            assert "ObjectLockMode" not in mp3 and "ObjectLockMode" not in sidecar
            assert ledger[recording_id] == (None, until, False)
            continue
        assert ledger[recording_id] == ("COMPLIANCE", until, False)
        for object_key in (key, sidecar_key(key)):
            found = versions(s3_client, lock_bucket, object_key)
            assert found
            for version in found:
                head = s3_client.head_object(Bucket=lock_bucket, Key=object_key, VersionId=version)
                assert head["ObjectLockMode"] == "COMPLIANCE"
                assert head["ObjectLockRetainUntilDate"] == until
                with pytest.raises(ClientError) as refused:
                    s3_client.delete_object(Bucket=lock_bucket, Key=object_key, VersionId=version)
                assert refused.value.response["Error"]["Code"] == "AccessDenied"
    # The old recording's objects carry no retention: deletable (an erase may remove them).
    old_key = key_of(sim, old)
    for version in versions(s3_client, lock_bucket, old_key):
        s3_client.delete_object(Bucket=lock_bucket, Key=old_key, VersionId=version)
    assert status_locks(invoke) == {
        "held": 0,
        "locked": 20,
        "lock_expired": 0,
        "written_without_retention": 1,
    }
    shown = invoke("status")
    assert "written without retention" in shown.output and "under retention" in shown.output


def test_large_mp3_gets_retention_and_class_through_multipart(
    simulator_factory: SimulatorFactory,
    invoke: Invoke,
    lock_bucket: str,
    s3_client: S3Client,
    s3_fault_proxy: FaultProxy,
) -> None:
    sim = simulator_factory(
        recordings=1, seed=5, available_fraction=1.0, media_size_range=(5_300_000, 5_400_000)
    )
    [recording_id] = sim.dataset.ids
    result = invoke(
        "archive",
        recording_id,
        sim=sim,
        RECARCHIVE_S3_BUCKET=lock_bucket,
        RECARCHIVE_S3_OBJECT_LOCK_MODE="GOVERNANCE",
        RECARCHIVE_S3_RETENTION_DAYS="3650",
        RECARCHIVE_S3_STORAGE_CLASS="GLACIER_IR",
        RECARCHIVE_S3_MULTIPART_THRESHOLD_BYTES=str(5 * 1024 * 1024),
        RECARCHIVE_S3_MULTIPART_CHUNK_BYTES=str(5 * 1024 * 1024),
    )
    assert result.exit_code == 0, result.output
    until = expected_until(created_of(sim, recording_id), 3650)
    [create] = [
        {name.lower(): value for name, value in info.headers.items()}
        for info, _ in s3_fault_proxy.log
        if info.method == "POST" and info.target.endswith("?uploads")
    ]
    assert create["x-amz-object-lock-mode"] == "GOVERNANCE"
    assert create["x-amz-object-lock-retain-until-date"] == until.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert create["x-amz-storage-class"] == "GLACIER_IR"
    head = s3_client.head_object(Bucket=lock_bucket, Key=key_of(sim, recording_id))
    assert (head["ObjectLockMode"], head["ObjectLockRetainUntilDate"]) == ("GOVERNANCE", until)


@pytest.mark.parametrize("window", [False, True], ids=["ids", "since-until"])
def test_lock_mode_on_a_bucket_without_object_lock_is_exit_2_before_bird(
    simulator_factory: SimulatorFactory,
    invoke: Invoke,
    s3_bucket: str,
    lock_bucket: str,
    s3_fault_proxy: FaultProxy,
    window: bool,
) -> None:
    sim = simulator_factory(recordings=4, seed=9, available_fraction=1.0)
    given = ["--since", "2025-01-01", "--until", "2026-01-01"] if window else sim.dataset.ids
    lock = {"RECARCHIVE_S3_OBJECT_LOCK_MODE": "GOVERNANCE", "RECARCHIVE_S3_RETENTION_DAYS": "30"}
    refused = invoke("archive", *given, sim=sim, RECARCHIVE_S3_BUCKET=s3_bucket, **lock)
    assert refused.exit_code == 2, refused.output
    assert "does not have S3 Object Lock enabled" in refused.output
    assert sim.requests == []
    asked = [info.target for info, _ in s3_fault_proxy.log]
    assert len(asked) == 1 and asked[0].endswith("?object-lock")
    # Control: the same settings on a bucket created with Object Lock run, with one check.
    s3_fault_proxy.log.clear()
    ran = invoke("archive", *given, sim=sim, RECARCHIVE_S3_BUCKET=lock_bucket, **lock)
    assert ran.exit_code == 0, ran.output
    checks = [info for info, _ in s3_fault_proxy.log if info.target.endswith("?object-lock")]
    assert len(checks) == 1
    assert "archived" in ran.output


# --- legal holds ---------------------------------------------------------------------------


def test_hold_on_and_off_round_trips(
    simulator_factory: SimulatorFactory,
    invoke: Invoke,
    env: dict[str, str],
    lock_bucket: str,
    s3_client: S3Client,
) -> None:
    sim = simulator_factory(recordings=4, seed=11, available_fraction=1.0)
    ids = sim.dataset.ids
    bucket = {"RECARCHIVE_S3_BUCKET": lock_bucket}
    assert invoke("archive", *ids[:3], sim=sim, **bucket).exit_code == 0
    assert invoke("archive", ids[3], "--skip-media", sim=sim, **bucket).exit_code == 0

    def holds(recording_id: str) -> set[str]:
        key = key_of(sim, recording_id)
        return {
            s3_client.get_object_legal_hold(Bucket=lock_bucket, Key=k, VersionId=v)["LegalHold"][
                "Status"
            ]
            for k in (key, sidecar_key(key))
            for v in versions(s3_client, lock_bucket, k)
        }

    on = invoke("hold", ids[0], ids[1], "--on")
    assert on.exit_code == 0, on.output
    assert holds(ids[0]) == holds(ids[1]) == {"ON"}
    assert status_locks(invoke)["held"] == 2
    assert [ledger_locks(env)[rid][2] for rid in ids] == [True, True, False, False]
    # Held, so even an unlocked version cannot be deleted.
    key = key_of(sim, ids[0])
    with pytest.raises(ClientError):
        s3_client.delete_object(
            Bucket=lock_bucket, Key=key, VersionId=versions(s3_client, lock_bucket, key)[0]
        )

    off = invoke("hold", ids[0], "--off")
    assert off.exit_code == 0, off.output
    assert holds(ids[0]) == {"OFF"} and holds(ids[1]) == {"ON"}
    assert status_locks(invoke)["held"] == 1
    assert [ledger_locks(env)[rid][2] for rid in ids] == [False, True, False, False]
    # Control: released (and never given a retention), its versions can be deleted again.
    for version in versions(s3_client, lock_bucket, key):
        s3_client.delete_object(Bucket=lock_bucket, Key=key, VersionId=version)

    unknown = "00000000-0000-4000-8000-000000000000"
    partly = invoke("hold", ids[2], ids[3], unknown, "--on")
    assert partly.exit_code == 1, partly.output
    assert "legal hold on for 1 recordings" in partly.output
    assert f"{unknown}: not in the ledger" in partly.output
    assert f"{ids[3]}: not archived (ledger state metadata_only)" in partly.output
    assert holds(ids[2]) == {"ON"}  # the others are held all the same
    assert status_locks(invoke)["held"] == 2


def test_hold_needs_on_or_off_and_a_locked_bucket(
    simulator_factory: SimulatorFactory, invoke: Invoke, s3_bucket: str
) -> None:
    sim = simulator_factory(recordings=1, seed=12, available_fraction=1.0)
    [recording_id] = sim.dataset.ids
    assert invoke("archive", recording_id, sim=sim, RECARCHIVE_S3_BUCKET=s3_bucket).exit_code == 0
    neither = invoke("hold", recording_id)
    assert neither.exit_code == 2 and "--on" in neither.output
    unlocked = invoke("hold", recording_id, "--on")
    assert unlocked.exit_code == 2 and "does not have S3 Object Lock enabled" in unlocked.output
    assert invoke("hold", "not-an-id", "--on").exit_code == 2


# --- verify and restores -------------------------------------------------------------------


@pytest.fixture
def slow_restores() -> Iterator[Callable[[str, str], None]]:
    """Restores that stay in progress: moto finishes each one at once by itself.

    Yields a function that marks the restore of one object (of the in-process moto server)
    in progress; it stays so until the test ends.
    """
    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.moto_api import state_manager
    from moto.s3.models import s3_backends

    def in_progress(bucket: str, key: str) -> None:
        stored = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].get_object(bucket, key)
        assert stored is not None
        stored.status = "IN_PROGRESS"

    state_manager.set_transition("s3::keyrestore", {"progression": "manual", "times": 10**9})
    try:
        yield in_progress
    finally:
        state_manager.unset_transition("s3::keyrestore")


def test_verify_deep_reports_and_requests_restores_of_glacier_objects(
    simulator_factory: SimulatorFactory,
    invoke: Invoke,
    s3_bucket: str,
    s3_client: S3Client,
    slow_restores: Callable[[str, str], None],
) -> None:
    sim = simulator_factory(recordings=3, seed=13, available_fraction=1.0)
    ids = sim.dataset.ids
    bucket = {"RECARCHIVE_S3_BUCKET": s3_bucket}
    # Two MP3s in GLACIER, one in the bucket's default class.
    glacier = {"RECARCHIVE_S3_STORAGE_CLASS": "GLACIER", **bucket}
    assert invoke("archive", *ids[:2], sim=sim, **glacier).exit_code == 0
    assert invoke("archive", ids[2], sim=sim, **bucket).exit_code == 0
    with pytest.raises(ClientError) as unreadable:
        s3_client.get_object(Bucket=s3_bucket, Key=key_of(sim, ids[0]))
    assert unreadable.value.response["Error"]["Code"] == "InvalidObjectState"

    shallow = invoke("verify", **bucket)
    assert shallow.exit_code == 0, shallow.output
    assert "3 ok, 0 problems" in shallow.output

    deep = invoke("verify", "--deep", **bucket)
    assert deep.exit_code == 0, deep.output
    assert "1 ok, 0 problems, 2 in an archive class" in deep.output
    assert all(f"{rid} {key_of(sim, rid)}: needs restore" in deep.output for rid in ids[:2])

    restore = invoke("verify", "--deep", "--restore", **bucket)
    assert restore.exit_code == 0, restore.output
    assert all(f"{key_of(sim, rid)}: restore requested" in restore.output for rid in ids[:2])
    for rid in ids[:2]:
        slow_restores(s3_bucket, key_of(sim, rid))
    head = s3_client.head_object(Bucket=s3_bucket, Key=key_of(sim, ids[0]))
    assert head["Restore"] == 'ongoing-request="true"'

    again = invoke("verify", "--deep", "--restore", **bucket)
    assert again.exit_code == 0, again.output
    assert again.output.count("restore in progress") == 2
    assert "restore requested" not in again.output


def test_restored_glacier_object_is_hashed_by_verify_deep(
    simulator_factory: SimulatorFactory, invoke: Invoke, s3_bucket: str, s3_client: S3Client
) -> None:
    sim = simulator_factory(recordings=1, seed=15, available_fraction=1.0)
    [recording_id] = sim.dataset.ids
    bucket = {"RECARCHIVE_S3_BUCKET": s3_bucket}
    glacier = {"RECARCHIVE_S3_STORAGE_CLASS": "GLACIER", **bucket}
    archived = invoke("archive", recording_id, sim=sim, **glacier)
    assert archived.exit_code == 0, archived.output
    assert "restore requested" in invoke("verify", "--restore", **bucket).output
    # moto restores at once: the copy is readable and its bytes are checked like any other.
    head = s3_client.head_object(Bucket=s3_bucket, Key=key_of(sim, recording_id))
    assert head["StorageClass"] == "GLACIER" and 'ongoing-request="false"' in head["Restore"]
    expiry = parsedate_to_datetime(head["Restore"].split('expiry-date="')[1].rstrip('"'))
    days = (expiry - datetime.now(UTC)) / timedelta(days=1)
    assert RESTORE_DAYS - 1 < days <= RESTORE_DAYS
    deep = invoke("verify", "--deep", **bucket)
    assert deep.exit_code == 0 and "1 ok, 0 problems" in deep.output, deep.output


# --- the ledger's lock columns, on both backends --------------------------------------------


def test_ledger_keeps_retention_and_holds_and_counts_them(store: ArchiveStore) -> None:
    records = [
        normalize_recording(make_payload(index), workspace_id="ws", fetched_at=NOW)
        for index in range(4)
    ]
    store.save_metadata(records)
    ids = [record.id for record in records]
    store.register(ids)
    work = {"pending", "metadata_only", "failed"}
    assert store.claim(ids, owner="a", lease_seconds=60, states=work) == ids
    future, past = datetime(2030, 1, 1, tzinfo=UTC), datetime(2020, 1, 1, tzinfo=UTC)
    locks: list[tuple[str | None, datetime | None]] = [
        ("COMPLIANCE", future),
        ("GOVERNANCE", future),
        (None, past),  # written without retention: the date had passed
        (None, None),  # no lock mode configured
    ]
    outcomes = [
        Outcome.archived(
            recording_id,
            bucket="b",
            key=f"k{n}",
            size_bytes=1,
            sha256="ab" * 32,
            lock_mode=mode,
            retain_until=until,
        )
        for n, (recording_id, (mode, until)) in enumerate(zip(ids, locks, strict=True))
    ]
    assert store.apply_outcomes(outcomes, owner="a") == {}
    assert store.lock_counts(now=NOW) == {
        "held": 0,
        "locked": 2,
        "lock_expired": 0,
        "written_without_retention": 1,
    }
    assert store.lock_counts(now=datetime(2031, 1, 1, tzinfo=UTC))["lock_expired"] == 2
    # Holds are recorded for archived rows only.
    assert (
        store.record_legal_hold([ids[0], ids[3], "00000000-0000-4000-8000-000000000000"], on=True)
        == 2
    )
    assert store.lock_counts(now=NOW)["held"] == 2
    assert store.record_legal_hold([ids[0]], on=False) == 1
    assert store.lock_counts(now=NOW)["held"] == 1
    ledger = archive_ledger.c
    with store.engine.connect() as connection:
        rows = dict(connection.execute(select(ledger.recording_id, ledger.legal_hold_at)).all())
    assert rows[ids[0]] is not None and rows[ids[1]] is None
