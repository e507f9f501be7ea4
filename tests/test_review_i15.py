"""Hostile review of issue 15's transcriptions: each test FAILS because of a defect.

Real parts as everywhere: the simulator (transcriptions on) as an HTTP server, moto's S3
server (versioned or Object Lock buckets), SQLite. Each docstring says what is wrong.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from recarchive.media.keys import transcription_key
from recarchive.simulator.server import SimulatorServer
from tests.fixtures.cli import cli_invoker, contract_env
from tests.fixtures.simulator import SimulatorFactory
from tests.test_transcriptions import ledger_rows, make_due, mp3_key, transcriptions_of

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

RECORDINGS = 60


@pytest.fixture
def sim(simulator_factory: SimulatorFactory) -> SimulatorServer:
    return simulator_factory(
        recordings=RECORDINGS,
        seed=15,
        available_fraction=1.0,
        media_size_range=(400, 3000),
        transcriptions=True,
    )


@pytest.fixture
def versioned_bucket(s3_client: S3Client, s3_bucket: str) -> str:
    s3_client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    return s3_bucket


def not_ready(sim: SimulatorServer) -> list[tuple[str, str]]:
    """(recording, transcription) of every ``accepted`` (not ready) simulated transcription."""
    return [
        (recording_id, item.id)
        for recording_id, items in transcriptions_of(sim).items()
        for item in items
        if item.status == "accepted"
    ]


def stored_keys(s3: S3Client, bucket: str, prefix: str = "") -> set[str]:
    versions = s3.list_object_versions(Bucket=bucket, Prefix=prefix)
    return {v["Key"] for v in versions.get("Versions", [])}


def test_a_transcription_still_processing_after_eight_looks_is_never_looked_at_again(
    sim: SimulatorServer, versioned_bucket: str, s3_endpoint: str, tmp_path: Path
) -> None:
    """A ``pending`` transcription is abandoned for good after ``item_max_attempts`` looks.

    ``_upsert`` counts every look at a not-ready transcription as an attempt (``looks = 1``
    for ``pending``) and ``due_transcriptions`` drops rows with ``attempts >= max_attempts``.
    With the defaults (recheck after one hour, 8 attempts) a transcription Bird takes more
    than ~8 hourly ``retry-failed`` runs to produce — or one a user creates a day after the
    call — is never archived, silently: no ``failed`` row, no reason, the run says
    ``succeeded``. The recordings' own rule is the opposite: a ``metadata_only`` recording
    (media not ready) is rechecked whatever its attempts (``due_retries``). Not ready is not
    a failure and must not use up the failure budget.
    """
    env = contract_env(tmp_path, sim, versioned_bucket, s3_endpoint)
    invoke = cli_invoker(env)
    url = env["RECARCHIVE_DATABASE_URL"]
    waiting = not_ready(sim)
    assert waiting
    assert invoke("archive", *sim.dataset.ids).exit_code == 0  # look 1
    for _ in range(7):  # seven hourly retry-failed runs while Bird still processes
        make_due(url)
        assert invoke("retry-failed").exit_code == 0
    sim.transcriptions.make_ready()  # Bird finishes them
    make_due(url)
    assert invoke("retry-failed").exit_code == 0
    rows = ledger_rows(url)
    states = {key: rows[key]["state"] for key in waiting}
    assert set(states.values()) == {"archived"}, (
        f"ready at Bird but never archived (pending rows no longer due): {states}"
    )


def test_rebuild_forgets_transcriptions_that_were_not_ready_yet(
    sim: SimulatorServer,
    versioned_bucket: str,
    s3_endpoint: str,
    tmp_path: Path,
    s3_client: S3Client,
) -> None:
    """After ``rebuild`` a recording's not-yet-ready transcription is never archived.

    ``rebuild`` restores only ``archived`` transcription rows (from the objects). A recording
    whose sidecar says ``transcription: true`` and whose transcription was ``pending`` gets no
    row at all (no ``pending`` one, no :data:`LISTING` one), the recording itself is
    ``archived``, so neither ``archive`` (skips archived IDs) nor ``retry-failed`` (looks only
    at due rows) ever asks Bird again: the transcription is lost for good unless an operator
    happens to run ``--refresh`` over exactly those IDs. The issue's rule for the MP3
    ("recordings that had no media yet ... are fetched again by the next run") has no
    counterpart here; the sidecar has the flag rebuild needs to leave a due ``LISTING`` row.
    """
    database = tmp_path / "db" / "archive.db"
    env = contract_env(tmp_path, sim, versioned_bucket, s3_endpoint, database=database)
    invoke = cli_invoker(env)
    waiting = not_ready(sim)
    assert waiting
    assert invoke("archive", *sim.dataset.ids).exit_code == 0
    shutil.rmtree(database.parent)
    rebuilt = invoke("rebuild", "--overwrite-parquet")
    assert rebuilt.exit_code == 0, rebuilt.output
    sim.transcriptions.make_ready()
    make_due(env["RECARCHIVE_DATABASE_URL"])
    assert invoke("retry-failed").exit_code == 0
    assert invoke("archive", *sim.dataset.ids).exit_code == 0
    keys = stored_keys(s3_client, versioned_bucket)
    missing = [
        (rid, tid)
        for rid, tid in waiting
        if transcription_key(mp3_key(sim, rid), tid, "json") not in keys
    ]
    assert missing == [], "ready at Bird, but after the rebuild nothing ever looks at them"


@pytest.fixture
def lock_bucket(s3_client: S3Client) -> str:
    name = f"recarchive-review15-lock-{os.getpid()}"
    s3_client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    return name


def test_a_transcription_archived_after_a_legal_hold_is_not_held(
    sim: SimulatorServer, lock_bucket: str, s3_endpoint: str, tmp_path: Path, s3_client: S3Client
) -> None:
    """A held recording's transcription archived later has no legal hold.

    ``hold --on`` holds the MP3, the sidecar and the transcriptions archived *so far*, and the
    ledger says the recording is held. A transcription that was not ready then is archived
    by a later ``retry-failed`` through ``store_transcription``, which never looks at the
    recording's ``legal_hold``: the new object is deletable (and the recording's record is
    no longer complete under hold) while the ledger and ``status`` claim it is held. A legal
    hold that misses part of the record is a compliance failure.
    """
    env = contract_env(tmp_path, sim, lock_bucket, s3_endpoint)
    invoke = cli_invoker(env)
    recording_id, transcription_id = not_ready(sim)[0]
    assert invoke("archive", *sim.dataset.ids).exit_code == 0
    held = invoke("hold", recording_id, "--on")
    assert held.exit_code == 0, held.output
    sim.transcriptions.make_ready(recording_id)
    make_due(env["RECARCHIVE_DATABASE_URL"])
    retried = invoke("retry-failed")
    assert retried.exit_code == 0, retried.output
    key = transcription_key(mp3_key(sim, recording_id), transcription_id, "json")
    head = s3_client.head_object(Bucket=lock_bucket, Key=key)  # archived now
    assert head.get("ObjectLockLegalHoldStatus") == "ON", (
        f"{key} of a held recording is not held: {head.get('ObjectLockLegalHoldStatus')}"
    )


def test_an_erase_during_retry_failed_leaves_a_transcription_of_the_erased_recording(
    sim: SimulatorServer,
    versioned_bucket: str,
    s3_endpoint: str,
    tmp_path: Path,
    s3_client: S3Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The transcription pass holds no lease: an erase meanwhile is undone by the pass.

    ``erase`` claims the recording's lease so no run works on it while it deletes, and
    ``retry_transcripts`` reads its targets (bucket, key) once, then lists and stores without
    claiming the recording or checking again that it is still ``archived``. Here the erase
    (a separate ``recarchive erase`` process) runs right after the pass read its targets:
    the erase succeeds (nothing holds a lease), then the pass stores the erased recording's
    transcription under its key and records an ``archived`` row for it — personal data kept
    after an erasure request was confirmed done, and a ledger row of an erased recording.
    """
    from recarchive.store.transcriptions import TranscriptionLedger

    env = contract_env(tmp_path, sim, versioned_bucket, s3_endpoint)
    invoke = cli_invoker(env)
    url = env["RECARCHIVE_DATABASE_URL"]
    recording_id, _ = not_ready(sim)[0]
    assert invoke("archive", *sim.dataset.ids).exit_code == 0
    sim.transcriptions.make_ready(recording_id)
    make_due(url)

    original = TranscriptionLedger.transcription_targets
    erased: list[str] = []

    def targets_then_erase(self: Any, ids: Any) -> Any:
        found = original(self, ids)
        if recording_id in found and not erased:
            command = Path(sys.executable).parent / "recarchive"
            done = subprocess.run(
                [str(command), "erase", recording_id, "--reason", "review"],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            erased.append(done.stdout + done.stderr)
            assert done.returncode == 0, erased[-1]
        return found

    monkeypatch.setattr(TranscriptionLedger, "transcription_targets", targets_then_erase)
    assert invoke("retry-failed").exit_code in (0, 1)
    assert erased, "the erase did not run"
    stem = mp3_key(sim, recording_id).removesuffix(".mp3")
    left = sorted(k for k in stored_keys(s3_client, versioned_bucket, stem) if "transcription" in k)
    rows = [key for key in ledger_rows(url) if key[0] == recording_id]
    assert (left, rows) == ([], []), (
        "an erased recording's transcription was stored after its erase"
    )


def test_the_content_of_another_recordings_transcription_is_stored_under_this_key(
    sim: SimulatorServer,
    versioned_bucket: str,
    s3_endpoint: str,
    tmp_path: Path,
    s3_client: S3Client,
) -> None:
    """A ``.json`` answer that is another transcription's (of another recording) is stored.

    The listing is checked strictly (``recordingId`` must be the recording asked about) but the
    content is only checked to be JSON: the document's own ``id`` and ``recordingId`` (which
    the simulated ``.json`` carries, as modelled from Bird) are never compared with the
    transcription asked for. A mixed-up answer (a caching proxy, a Bird bug) puts recording
    B's call text under recording A's key, checksummed and ``archived`` for good: the wrong
    object, and another person's data in A's record (and not erased with B).
    """
    import json

    by_recording = transcriptions_of(sim)
    ready = [
        (rid, t) for rid, items in by_recording.items() for t in items if t.status == "available"
    ]
    (rid_a, a), (_rid_b, b) = ready[0], next((r, t) for r, t in ready if r != ready[0][0])
    other = sim.transcriptions.content(b.id, "json")
    assert other is not None
    sim.transcriptions.set_content(a.id, "json", other)
    invoke = cli_invoker(contract_env(tmp_path, sim, versioned_bucket, s3_endpoint))
    assert invoke("archive", rid_a).exit_code in (0, 1)
    key = transcription_key(mp3_key(sim, rid_a), a.id, "json")
    if key in stored_keys(s3_client, versioned_bucket):
        stored = json.loads(s3_client.get_object(Bucket=versioned_bucket, Key=key)["Body"].read())
        assert (stored["id"], stored["recordingId"]) == (a.id, rid_a), (
            f"{key} holds transcription {stored['id']} of recording {stored['recordingId']}"
        )


def test_one_malformed_transcription_keeps_its_good_sibling_from_ever_being_archived(
    sim: SimulatorServer,
    versioned_bucket: str,
    s3_endpoint: str,
    tmp_path: Path,
    s3_client: S3Client,
) -> None:
    """One bad item in a recording's list loses every other transcription of it for good.

    ``for_recording`` raises :class:`PayloadError` for the whole listing when any one item is
    malformed (here a non-ASCII locale, which must indeed never reach S3 metadata). The
    recording gets one ``failed`` ``*`` row; ``PayloadError`` is a ``TerminalError``, so it
    has no next attempt: the recording's *good*, ``available`` transcription in the same
    answer is never archived, not now and not by any ``retry-failed``. The bad item (its ID
    parses) should be the ``failed`` item, its sibling archived.
    """
    import json

    by_recording = transcriptions_of(sim)
    rid, good = next(
        (r, t) for r, items in by_recording.items() for t in items if t.status == "available"
    )
    bad = {**good.document(), "id": "0f0f0f0f-0000-4000-8000-000000000001", "locale": "fr-CA-é"}
    sim.transcriptions.raw_lists[rid] = json.dumps({"results": [good.document(), bad]}).encode()
    env = contract_env(tmp_path, sim, versioned_bucket, s3_endpoint)
    invoke = cli_invoker(env)
    assert invoke("archive", rid).exit_code in (0, 1)
    make_due(env["RECARCHIVE_DATABASE_URL"])
    assert invoke("retry-failed").exit_code in (0, 1)
    key = transcription_key(mp3_key(sim, rid), good.id, "json")
    rows = {
        k[1]: (r["state"], r["next_attempt_at"])
        for k, r in ledger_rows(env["RECARCHIVE_DATABASE_URL"]).items()
    }
    assert key in stored_keys(s3_client, versioned_bucket), f"good sibling never archived: {rows}"


def test_the_transcription_modules_do_not_reach_into_other_classes_privates() -> None:
    """``media/transcripts.py`` and ``bird/transcriptions.py`` call other classes' privates.

    ``store_transcription`` calls ``MediaStore._store`` and ``MediaStore._sse_args``;
    ``TranscriptionsClient`` calls ``BirdClient._send`` and ``BirdClient._json_object`` (and
    ``_send`` grew a ``limits`` argument for it). No other module of ``src/`` calls another
    class's ``_store``/``_sse_args``/``_send``/``_json_object``. Neither ruff (SLF001 is not
    selected) nor ``tests/test_architecture.py`` catches it, so a change of those internals
    (the 412 adoption, the SSE arguments, the retry loop) silently changes how transcriptions
    are fetched and written, and no test of ``MediaStore``/``BirdClient`` covers these callers.
    Both classes should offer the call publicly (e.g. ``MediaStore.put_once`` and
    ``BirdClient.get``).
    """
    src = Path(__file__).parents[1] / "src/recarchive"
    found = [
        f"{name}: {call}"
        for name, calls in (
            ("media/transcripts.py", ("media._store(", "media._sse_args(")),
            ("bird/transcriptions.py", ("._bird._send(", "bird._send(", "._bird._json_object(")),
        )
        for call in calls
        if call in (src / name).read_text()
    ]
    assert found == []


def test_two_concurrent_retry_failed_runs_fetch_and_write_one_transcription_twice(
    sim: SimulatorServer,
    versioned_bucket: str,
    s3_endpoint: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two ``retry-failed`` runs both archive the same due transcription.

    Recordings are claimed with leases so two runs never work on one; the transcription pass
    (``retry_transcripts``) claims nothing: both runs read the same due rows, both GET the
    content from Bird and both PUT it (the second PUT is refused with 412 and adopted, so one
    version survives — but Bird was asked twice, the rate budget spent twice, and the ledger
    row is written by both). The bar is "never a content GET again". The second run here is
    a separate ``recarchive retry-failed`` process, started right after the first read the
    recording's transcription rows (the window is the listing and content requests, i.e.
    the whole of a recording's transcription work).
    """
    from recarchive.store.transcriptions import TranscriptionLedger

    env = contract_env(tmp_path, sim, versioned_bucket, s3_endpoint)
    invoke = cli_invoker(env)
    recording_id, transcription_id = not_ready(sim)[0]
    assert invoke("archive", *sim.dataset.ids).exit_code == 0
    sim.transcriptions.make_ready()
    make_due(env["RECARCHIVE_DATABASE_URL"])
    original = TranscriptionLedger.transcription_rows
    second: list[str] = []

    def rows_then_another_run(self: Any, ids: Any) -> Any:
        found = original(self, ids)
        if list(ids) == [recording_id] and not second:
            command = Path(sys.executable).parent / "recarchive"
            done = subprocess.run(
                [str(command), "retry-failed"],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            second.append(done.stdout + done.stderr)
            assert done.returncode == 0, second[-1]
        return found

    monkeypatch.setattr(TranscriptionLedger, "transcription_rows", rows_then_another_run)
    sim.clear_requests()
    assert invoke("retry-failed").exit_code == 0
    assert second, "the second run did not run"
    gets = [r.path for r in sim.api_requests() if r.path.endswith(f"{transcription_id}.json")]
    assert len(gets) == 1, f"the content of {transcription_id} was fetched {len(gets)} times"


def test_an_adopted_transcription_gets_a_ledger_archived_at_its_object_does_not_carry(
    sim: SimulatorServer,
    versioned_bucket: str,
    s3_endpoint: str,
    tmp_path: Path,
    s3_client: S3Client,
) -> None:
    """After a partial failure the ledger's ``archived_at`` differs from the object's metadata.

    ``_one`` stamps ``archived_at = now`` for every look. When the ``.json`` was stored by an
    earlier look whose ``.txt`` then failed (a 503 here), the next look's create-only write of
    the ``.json`` is refused and adopted — but the row records the *new* time while the
    object's ``archived-at`` metadata keeps the first. ``rebuild`` restores ``archived_at``
    from that metadata, so the round trip "equal except run history and fetch timestamps" is
    broken for such rows (and the ledger says a time at which nothing was written). The
    adopted object's own ``archived-at`` should be kept (as the MP3's adoption does).
    """
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from recarchive.store.engine import create_engine_for
    from recarchive.store.tables import transcription_ledger

    rid, item = next(
        (r, t)
        for r, items in transcriptions_of(sim).items()
        for t in items
        if t.status == "available" and t.has_txt
    )
    txt_path = f"/workspaces/{sim.config.workspace_id}/transcriptions/{item.id}.txt"
    sim.transcriptions.fail_next[txt_path] = 1
    env = contract_env(tmp_path, sim, versioned_bucket, s3_endpoint)
    invoke = cli_invoker(env)
    url = env["RECARCHIVE_DATABASE_URL"]
    assert invoke("archive", rid, RECARCHIVE_HTTP_MAX_ATTEMPTS="1").exit_code == 1
    assert ledger_rows(url)[(rid, item.id)]["state"] == "failed"
    engine = create_engine_for(url)
    with engine.begin() as connection:  # its backoff has passed
        connection.execute(
            update(transcription_ledger).values(
                next_attempt_at=datetime.now(UTC) - timedelta(minutes=1)
            )
        )
    engine.dispose()
    assert invoke("retry-failed").exit_code == 0
    row = ledger_rows(url)[(rid, item.id)]
    assert row["state"] == "archived"
    head = s3_client.head_object(Bucket=versioned_bucket, Key=row["json_key"])
    stored = datetime.fromisoformat(head["Metadata"]["archived-at"])
    raw = row["archived_at"]  # SQLite gives the text back here
    recorded = raw if isinstance(raw, datetime) else datetime.fromisoformat(str(raw))
    recorded = recorded if recorded.tzinfo else recorded.replace(tzinfo=UTC)
    assert recorded == stored, f"ledger archived_at {recorded} != object's {stored}"
