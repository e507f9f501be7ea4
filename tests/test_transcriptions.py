"""Transcriptions: archived beside the MP3 once, never created at Bird, looked at again.

End to end through the CLI, configured by the contract's variables only: the simulator (with
its transcriptions on) as a real HTTP server, moto's S3 server with a *versioned* bucket (a
second write of a key would leave a second version), SQLite and PostgreSQL.

* every simulated recording with an ``available`` transcription has its ``.json`` (and
  ``.txt`` where the simulator offers one) in S3, bytes equal to the simulator's, with their
  ``sha256`` metadata; the ledger says ``archived`` with the same keys, sizes and hashes;
* a rerun and an ``--refresh`` write nothing new (one version per object) and request no
  content again; no POST (create) ever reaches the simulator; recordings without a
  transcription cost no transcription request;
* ``accepted`` ones are ``pending``; once ready, ``retry-failed`` archives them exactly once,
  and ``retry-failed --dry-run`` counted the recordings its pass then looked at;
* no secret (the access key, the transcription URLs' signatures) is in the ledger, the
  output or the objects' metadata.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import text, update
from typer.testing import Result

from recarchive.errors import ClientRequestError
from recarchive.media.keys import media_key, transcription_key
from recarchive.simulator.server import SimulatorServer
from recarchive.simulator.transcripts import SimTranscription
from recarchive.store.engine import create_engine_for
from recarchive.store.tables import transcription_ledger
from tests.fixtures.cli import Invoke, cli_invoker, contract_env
from tests.fixtures.simulator import SimulatorFactory

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

PREFIX = "recordings"
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


@pytest.fixture
def env(
    tmp_path: Path, sim: SimulatorServer, versioned_bucket: str, s3_endpoint: str, database_url: str
) -> dict[str, str]:
    env = contract_env(tmp_path, sim, versioned_bucket, s3_endpoint)
    env["RECARCHIVE_DATABASE_URL"] = database_url
    return env


@pytest.fixture
def invoke(env: dict[str, str]) -> Invoke:
    return cli_invoker(env)


def run_json(result: Result) -> dict[str, Any]:
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, result.output
    document: dict[str, Any] = json.loads(lines[0])
    return document


def transcriptions_of(sim: SimulatorServer) -> dict[str, list[SimTranscription]]:
    """The simulator's transcriptions, by recording (only recordings that have some)."""
    found: dict[str, list[SimTranscription]] = {}
    for recording_id in sim.dataset.ids:
        items = sim.transcriptions.for_recording(recording_id)
        if items:
            found[recording_id] = items
    return found


def mp3_key(sim: SimulatorServer, recording_id: str) -> str:
    payload = sim.dataset.payload(recording_id)
    assert payload is not None
    created = datetime.fromisoformat(payload["createdAt"].replace("Z", "+00:00"))
    return media_key(PREFIX, sim.config.workspace_id, recording_id, created)


def expected_objects(sim: SimulatorServer) -> dict[str, bytes]:
    """Key -> bytes of every transcription object the archive must hold now."""
    objects: dict[str, bytes] = {}
    for recording_id, items in transcriptions_of(sim).items():
        for item in items:
            for fmt in ("json", "txt"):
                data = sim.transcriptions.content(item.id, fmt)
                if data is not None:
                    objects[transcription_key(mp3_key(sim, recording_id), item.id, fmt)] = data
    return objects


def transcription_versions(s3: S3Client, bucket: str) -> Counter[str]:
    versions = s3.list_object_versions(Bucket=bucket)
    assert versions.get("DeleteMarkers", []) == []
    return Counter(v["Key"] for v in versions.get("Versions", []) if ".transcription." in v["Key"])


def ledger_rows(database_url: str) -> dict[tuple[str, str], dict[str, Any]]:
    engine = create_engine_for(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT * FROM transcription_ledger")).mappings()
            return {(row["recording_id"], row["transcription_id"]): dict(row) for row in rows}
    finally:
        engine.dispose()


def content_requests(sim: SimulatorServer) -> list[str]:
    return [
        r.path for r in sim.api_requests() if "/transcriptions/" in r.path and "." in r.path[-5:]
    ]


def make_due(database_url: str) -> None:
    """An hour passes: the pending rows' next look is due."""
    engine = create_engine_for(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                update(transcription_ledger)
                .where(transcription_ledger.c.state == "pending")
                .values(next_attempt_at=datetime.now(UTC) - timedelta(minutes=1))
            )
    finally:
        engine.dispose()


def assert_archive_matches(
    sim: SimulatorServer, s3: S3Client, bucket: str, database_url: str
) -> dict[tuple[str, str], dict[str, Any]]:
    """S3 and the ledger hold exactly the available transcriptions, once each."""
    expected = expected_objects(sim)
    versions = transcription_versions(s3, bucket)
    assert set(versions) == set(expected)
    assert all(count == 1 for count in versions.values()), versions
    for key, data in expected.items():
        stored = s3.get_object(Bucket=bucket, Key=key)
        digest = hashlib.sha256(data).hexdigest()
        assert stored["Body"].read() == data
        assert stored["Metadata"]["sha256"] == digest
    rows = ledger_rows(database_url)
    for recording_id, items in transcriptions_of(sim).items():
        key = mp3_key(sim, recording_id)
        for item in items:
            row = rows[(recording_id, item.id)]
            if item.status == "available":
                assert row["state"] == "archived", row
                assert row["s3_bucket"] == bucket and row["locale"] == item.locale
                json_key = transcription_key(key, item.id, "json")
                assert (row["json_key"], row["json_size"], row["json_sha256"]) == (
                    json_key,
                    len(expected[json_key]),
                    hashlib.sha256(expected[json_key]).hexdigest(),
                )
                txt_key = transcription_key(key, item.id, "txt")
                if item.has_txt:
                    assert row["txt_key"] == txt_key
                    assert row["txt_sha256"] == hashlib.sha256(expected[txt_key]).hexdigest()
                else:
                    assert row["txt_key"] is None and row["txt_size"] is None
            elif item.status == "accepted":
                assert row["state"] == "pending" and row["next_attempt_at"] is not None
            else:
                assert row["state"] == "unavailable" and "gave up" in row["last_error"]
    return rows


def test_transcriptions_are_archived_once_across_reruns_and_retries(
    invoke: Invoke,
    sim: SimulatorServer,
    s3_client: S3Client,
    versioned_bucket: str,
    database_url: str,
) -> None:
    ids = sim.dataset.ids
    by_recording = transcriptions_of(sim)
    statuses = Counter(item.status for items in by_recording.values() for item in items)
    # The seeded data covers every case: ready, not ready, given up; with and without .txt.
    assert statuses["available"] >= 10 and statuses["accepted"] >= 2 and statuses["failed"] >= 1
    ready = [t for items in by_recording.values() for t in items if t.status == "available"]
    assert any(not t.has_txt for t in ready)

    first = invoke("archive", "--json", *ids)
    assert first.exit_code == 0, first.output
    summary = run_json(first)["transcriptions"]
    assert summary["archived"] == statuses["available"]
    assert summary["pending"] == statuses["accepted"]
    assert summary["unavailable"] == statuses["failed"]
    assert summary["failed"] == 0 and summary["recordings"] == len(by_recording)
    rows = assert_archive_matches(sim, s3_client, versioned_bucket, database_url)
    # Only recordings whose payload says transcription: true were asked about theirs.
    asked = {r.path.split("/")[4] for r in sim.api_requests() if r.path.endswith("/transcriptions")}
    assert asked == set(by_recording)
    # One request per format; a .txt Bird does not offer answered 404 once.
    assert len(content_requests(sim)) == len(expected_objects(sim)) + sum(
        1 for t in ready if not t.has_txt
    )

    # A rerun: archived recordings are skipped without a request; an --refresh lists again
    # but requests no content, and neither writes an object.
    sim.clear_requests()
    again = invoke("archive", *ids)
    assert again.exit_code == 0, again.output
    assert not [r for r in sim.api_requests() if "/transcriptions" in r.path]
    refresh = invoke("archive", "--refresh", "--json", *ids)
    assert refresh.exit_code == 0, refresh.output
    assert content_requests(sim) == []
    assert run_json(refresh)["transcriptions"]["already_archived"] == statuses["available"]
    assert_archive_matches(sim, s3_client, versioned_bucket, database_url)

    # Ready an hour later: retry-failed's own pass archives them, exactly once.
    made_ready = sim.transcriptions.make_ready()
    assert made_ready == statuses["accepted"]
    make_due(database_url)
    waiting = {
        rid for (rid, _), row in ledger_rows(database_url).items() if row["state"] == "pending"
    }
    plan = invoke("retry-failed", "--dry-run", "--json")
    assert json.loads(plan.stdout.strip().splitlines()[-1])["transcriptions_due"] == len(waiting)
    sim.clear_requests()
    retried = invoke("retry-failed", "--json")
    assert retried.exit_code == 0, retried.output
    document = run_json(retried)["transcriptions"]
    assert document["recordings"] == len(waiting)
    assert document["archived"] == made_ready and document["pending"] == 0
    after = assert_archive_matches(sim, s3_client, versioned_bucket, database_url)
    assert {k for k, row in after.items() if row["state"] == "archived"} > {
        k for k, row in rows.items() if row["state"] == "archived"
    }
    sim.clear_requests()
    assert invoke("retry-failed").exit_code == 0
    assert not [r for r in sim.api_requests() if "/transcriptions" in r.path]

    # recarchive never asked Bird to create a transcription.
    assert sim.transcriptions.created == []
    assert not [r for r in sim.requests if r.method == "POST"]
    # No secret anywhere: the ledger, the output, the objects' metadata.
    # (The simulator's transcription URLs are signed with the ID's first 16 hex digits.)
    signatures = {uuid.UUID(t.id).hex[:16] for items in by_recording.values() for t in items}
    secrets = {sim.config.access_key, "X-Amz-Signature", *signatures}
    rows_text = json.dumps(list(after.values()), default=str)
    texts = [first.output, refresh.output, retried.output, rows_text]
    for key in expected_objects(sim):
        texts.append(
            json.dumps(s3_client.head_object(Bucket=versioned_bucket, Key=key)["Metadata"])
        )
    assert [s for s in secrets if any(s in t for t in texts)] == []


def test_control_without_the_ledger_a_refresh_requests_content_again(
    invoke: Invoke,
    sim: SimulatorServer,
    monkeypatch: pytest.MonkeyPatch,
    s3_client: S3Client,
    versioned_bucket: str,
    database_url: str,
) -> None:
    # The control of "a --refresh requests no content again": without the archived rows
    # (read as none), the same refresh asks Bird for every content again.
    from recarchive.store.transcriptions import TranscriptionLedger

    ids = sim.dataset.ids
    assert invoke("archive", *ids).exit_code == 0
    monkeypatch.setattr(TranscriptionLedger, "transcription_rows", lambda self, ids: {})
    sim.clear_requests()
    assert invoke("archive", "--refresh", *ids).exit_code == 0
    assert len(content_requests(sim)) >= len(expected_objects(sim))
    # Even then nothing is written twice: each create-only write is refused and the object
    # adopted, as after a killed run (one version per key, the ledger unchanged).
    assert_archive_matches(sim, s3_client, versioned_bucket, database_url)


REBUILT_COLUMNS = (
    "recording_id, transcription_id, state, bird_status, locale, s3_bucket, json_key, json_size, "
    "json_sha256, txt_key, txt_size, txt_sha256, archived_at"
)


def test_rebuild_gives_back_the_archived_transcriptions_rows(
    sim: SimulatorServer,
    versioned_bucket: str,
    s3_endpoint: str,
    tmp_path: Path,
    s3_client: S3Client,
) -> None:
    database = tmp_path / "db" / "archive.db"
    env = contract_env(tmp_path, sim, versioned_bucket, s3_endpoint, database=database)
    invoke = cli_invoker(env)
    assert invoke("archive", *sim.dataset.ids).exit_code == 0
    url = env["RECARCHIVE_DATABASE_URL"]
    query = (
        f"SELECT {REBUILT_COLUMNS} FROM transcription_ledger WHERE state = 'archived' ORDER BY 1, 2"
    )

    def archived_rows() -> list[dict[str, Any]]:
        engine = create_engine_for(url)
        try:
            with engine.connect() as connection:
                return [dict(row) for row in connection.execute(text(query)).mappings()]
        finally:
            engine.dispose()

    original = archived_rows()
    assert len(original) >= 10
    shutil.rmtree(database.parent)
    before = transcription_versions(s3_client, versioned_bucket)
    result = invoke("rebuild", "--overwrite-parquet")
    assert result.exit_code == 0, result.output
    assert archived_rows() == original
    assert transcription_versions(s3_client, versioned_bucket) == before  # nothing written


def test_verify_checks_and_erase_removes_the_transcriptions(
    invoke: Invoke,
    sim: SimulatorServer,
    s3_client: S3Client,
    versioned_bucket: str,
    database_url: str,
) -> None:
    assert invoke("archive", *sim.dataset.ids).exit_code == 0
    verified = invoke("verify", "--deep", "--json")
    assert verified.exit_code == 0, verified.output
    # One transcription object goes missing: verify names it.
    key = sorted(expected_objects(sim))[0]
    s3_client.delete_object(Bucket=versioned_bucket, Key=key)
    broken = invoke("verify", "--json")
    assert broken.exit_code == 1
    problems = run_json(broken)["problems"]
    assert [p["key"] for p in problems] == [key]
    assert "transcription" in problems[0]["problem"] and "missing" in problems[0]["problem"]

    # Erasing a recording deletes its transcriptions' rows with its own.
    recording_id = next(rid for rid in transcriptions_of(sim) if rid not in key)
    erased = invoke("erase", recording_id, "--reason", "test")
    assert erased.exit_code == 0, erased.output
    rows = ledger_rows(database_url)
    assert not [k for k in rows if k[0] == recording_id]
    assert [k for k in rows if k[0] != recording_id]


def test_a_failed_transcription_makes_the_run_partial_in_the_metrics_file(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from recarchive.model import RunCounts, RunStatus, TranscriptionCounts
    from recarchive.run.metrics import write_run_metrics
    from recarchive.run.runs import RunReport, report_table, run_status

    transcripts = TranscriptionCounts(recordings=3, archived=2, pending=1)
    transcripts.record_failure("r", "transcription t: refused")
    counts = RunCounts(requested=3, archived=3)
    assert run_status(counts) == RunStatus.SUCCEEDED
    assert run_status(counts, transcripts) == RunStatus.PARTIAL
    report = RunReport(1, "archive", RunStatus.PARTIAL, counts, None, 1.0, None, transcripts)
    path = tmp_path / "recarchive.prom"
    assert write_run_metrics(str(path), report, finished_at=10.0)
    samples = {
        (s.name, s.labels.get("outcome")): s.value
        for family in text_string_to_metric_families(path.read_text())
        for s in family.samples
        if s.labels.get("kind") == "archive"
    }
    assert samples[("recarchive_last_run_transcriptions", "archived")] == 2
    assert samples[("recarchive_last_run_transcriptions", "pending")] == 1
    assert samples[("recarchive_last_run_transcriptions", "failed")] == 1
    assert samples[("recarchive_last_run_success", None)] == 0
    # The flows' artifact table shows them too.
    table = {row["item"]: row["value"] for row in report_table(report)}
    assert table["transcriptions archived"] == 2 and table["transcriptions failed"] == 1
    assert table["transcription failed r"] == "transcription t: refused"


async def test_the_simulated_api_and_the_client_agree_page_by_page(
    sim: SimulatorServer,
    bird_client_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import httpx

    import recarchive.bird.transcriptions as module

    ws = f"{sim.api_url}/workspaces/{sim.config.workspace_id}"
    async with httpx.AsyncClient() as http:
        # The key is required, as everywhere; the workspace's list pages like the others.
        assert (await http.get(f"{ws}/transcriptions")).status_code == 401
        auth = {"Authorization": f"AccessKey {sim.config.access_key}"}
        seen: list[str] = []
        token = None
        while True:
            params = {"limit": "5", **({"pageToken": token} if token else {})}
            page = (await http.get(f"{ws}/transcriptions", params=params, headers=auth)).json()
            seen += [item["id"] for item in page["results"]]
            token = page.get("nextPageToken")
            if not token:
                break
        assert seen == [item.id for item in sim.transcriptions.all()]
        one = sim.transcriptions.all()[0]
        meta = (await http.get(f"{ws}/transcriptions/{one.id}", headers=auth)).json()
        assert meta == one.document()
    # The client follows nextPageToken (one transcription per page here).
    monkeypatch.setattr(module, "PAGE_SIZE", 1)
    two = next(rid for rid, items in transcriptions_of(sim).items() if len(items) == 2)
    listed = await module.TranscriptionsClient(bird_client_factory(sim)).for_recording(two)
    assert [t.id for t in listed] == [t.id for t in sim.transcriptions.for_recording(two)]
    pages = [r for r in sim.api_requests() if r.path.endswith(f"{two}/transcriptions")]
    assert len(pages) == 2 and pages[1].query.get("pageToken")
    assert sim.transcriptions.created == []


def test_transcriptions_get_the_mp3s_retention_and_its_legal_hold(
    sim: SimulatorServer, s3_client: S3Client, s3_endpoint: str, tmp_path: Path
) -> None:
    bucket = f"recarchive-tlock-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    env = contract_env(tmp_path, sim, bucket, s3_endpoint) | {
        "RECARCHIVE_S3_OBJECT_LOCK_MODE": "GOVERNANCE",
        "RECARCHIVE_S3_RETENTION_DAYS": "3650",  # from createdAt (2025): still running
    }
    invoke = cli_invoker(env)
    assert invoke("archive", *sim.dataset.ids).exit_code == 0
    objects = expected_objects(sim)
    for key in objects:
        head = s3_client.head_object(Bucket=bucket, Key=key)
        mp3 = s3_client.head_object(Bucket=bucket, Key=key.split(".transcription.")[0] + ".mp3")
        assert head["ObjectLockMode"] == mp3["ObjectLockMode"] == "GOVERNANCE"
        assert head["ObjectLockRetainUntilDate"] == mp3["ObjectLockRetainUntilDate"]
        assert head.get("StorageClass", "STANDARD") == "STANDARD"
    recording_id = next(rid for rid in transcriptions_of(sim) if any(rid in k for k in objects))
    held = invoke("hold", recording_id, "--on")
    assert held.exit_code == 0, held.output
    mine = [key for key in objects if recording_id in key]
    assert mine
    for key in mine:
        hold = s3_client.get_object_legal_hold(Bucket=bucket, Key=key)["LegalHold"]["Status"]
        assert hold == "ON"


@pytest.mark.parametrize("recording_id", ["", ".", ".."], ids=["empty", "dot", "dot-dot"])
async def test_an_id_that_names_no_child_path_is_refused_before_any_request(
    sim: SimulatorServer, bird_client_factory: Any, recording_id: str
) -> None:
    # ".." would have listed the workspace's transcriptions (recordings/../transcriptions).
    import recarchive.bird.transcriptions as module

    sent = len(sim.api_requests())
    with pytest.raises(ClientRequestError, match="not a recording ID"):
        await module.TranscriptionsClient(bird_client_factory(sim)).for_recording(recording_id)
    assert len(sim.api_requests()) == sent
