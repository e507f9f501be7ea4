"""One misbehaving transcription answer: a clear ``failed`` with its reason, or as documented.

Each case makes the simulator (a real HTTP server) misbehave for one recording's
transcription — its list answer, its content, its status, or what S3 already holds at its
key — and archives that recording with a few good ones through the CLI. Every case asserts:

* the run ends (no hang: a timeout guards it) with the exit code the contract gives (1 when a
  transcription failed, else 0) and no traceback;
* the transcription's ledger row (or, when its listing failed, the recording's ``*`` row)
  has the expected state, and the expected reason in ``last_error``;
* S3 holds exactly the simulator's bytes for it when it is archived, nothing when it is not,
  and an object that was there already is never overwritten;
* no secret (the access key, the transcription URL's signature) is in the output or ledger.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import text

from recarchive.media.keys import transcription_key
from recarchive.simulator.server import SimulatorServer
from recarchive.store.engine import create_engine_for
from tests.fixtures.cli import cli_invoker, contract_env
from tests.fixtures.simulator import SimulatorFactory
from tests.test_transcriptions import mp3_key

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

pytestmark = pytest.mark.timeout(90)

MiB = 1024 * 1024
OTHER_BYTES = b'{"not": "the simulator\'s"}'


@dataclass(frozen=True)
class Target:
    """The recording a case is about, and its one transcription."""

    sim: SimulatorServer
    recording_id: str
    transcription_id: str
    key: str
    s3: Any
    bucket: str

    def document(self, **changes: Any) -> dict[str, Any]:
        item = self.sim.transcriptions.get(self.transcription_id)
        assert item is not None
        return {**item.document(), **changes}

    def answer_list(self, body: Any) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.sim.transcriptions.raw_lists[self.recording_id] = raw

    def path(self, suffix: str) -> str:
        ws = self.sim.config.workspace_id
        if suffix == "list":
            return f"/workspaces/{ws}/recordings/{self.recording_id}/transcriptions"
        return f"/workspaces/{ws}/transcriptions/{self.transcription_id}.{suffix}"


@dataclass(frozen=True)
class Case:
    """One hostile answer and what must come of it."""

    id: str
    setup: Callable[[Target], None]
    state: str
    reason: str | None = None
    listing: bool = False  # the row is the recording's listing row ("*")
    exit_code: int = 1


def _stored_other(target: Target) -> None:
    import hashlib

    target.s3.put_object(
        Bucket=target.bucket,
        Key=transcription_key(target.key, target.transcription_id, "json"),
        Body=OTHER_BYTES,
        Metadata={"sha256": hashlib.sha256(OTHER_BYTES).hexdigest()},
    )


def _fail_then_answer(target: Target) -> None:
    target.sim.transcriptions.fail_next[target.path("list")] = 2
    target.sim.transcriptions.fail_next[target.path("json")] = 2


CASES = [
    Case(
        "list-not-json",
        lambda t: t.answer_list(b"<html>busy</html>"),
        "failed",
        "not JSON",
        listing=True,
    ),
    Case(
        "list-results-not-a-list",
        lambda t: t.answer_list({"results": {"id": t.transcription_id}}),
        "failed",
        "'results' is not a list",
        listing=True,
    ),
    Case(
        "list-item-without-recording-id",
        lambda t: t.answer_list({"results": [{"id": t.transcription_id}]}),
        "failed",
        "has no 'recordingId'",
        # The item's id is readable: it fails alone, its siblings go on (review i15).
        listing=False,
    ),
    Case(
        "list-item-of-another-recording",
        lambda t: t.answer_list({"results": [t.document(recordingId=str(uuid.uuid4()))]}),
        "failed",
        "belongs to recording",
        # The item's id is readable: it fails alone, its siblings go on (review i15).
        listing=False,
    ),
    Case(
        "list-item-stereo-not-bool",
        lambda t: t.answer_list({"results": [t.document(stereo="yes")]}),
        "failed",
        "bad stereo",
        # The item's id is readable: it fails alone, its siblings go on (review i15).
        listing=False,
    ),
    Case(
        "list-repeats-its-page-token",
        lambda t: t.answer_list({"results": [t.document()], "nextPageToken": "again"}),
        "failed",
        "repeated nextPageToken",
        listing=True,
    ),
    # Assumption 1: a bare Transcription object where a list was expected is a list of one.
    Case("list-is-a-bare-object", lambda t: t.answer_list(t.document()), "archived", exit_code=0),
    Case("5xx-then-ok", _fail_then_answer, "archived", exit_code=0),
    # Assumption 3: .txt may be missing; then only .json is archived.
    Case(
        "txt-404",
        lambda t: t.sim.transcriptions.set_offers_txt(t.transcription_id, False),
        "archived",
        exit_code=0,
    ),
    Case(
        "content-oversized",
        lambda t: t.sim.transcriptions.set_content(
            t.transcription_id, "json", b'"' + b"x" * (17 * MiB) + b'"'
        ),
        "failed",
        "larger than",
    ),
    Case(
        "content-not-json",
        lambda t: t.sim.transcriptions.set_content(t.transcription_id, "json", b"<html>x</html>"),
        "failed",
        "not JSON",
    ),
    Case(
        "content-names-another-transcription",
        lambda t: t.sim.transcriptions.set_content(
            t.transcription_id, "json", json.dumps({"id": str(uuid.uuid4()), "text": "x"}).encode()
        ),
        "failed",
        "its id is not",
    ),
    Case(
        "content-names-another-recording",
        lambda t: t.sim.transcriptions.set_content(
            t.transcription_id,
            "json",
            json.dumps({"recordingId": str(uuid.uuid4()), "text": "x"}).encode(),
        ),
        "failed",
        "its recordingId is not",
    ),
    Case(
        "key-holds-other-bytes",
        _stored_other,
        "failed",
        "already holds different",
    ),
    # Assumption 2: statuses.
    Case(
        "status-processing",
        lambda t: t.sim.transcriptions.set_status(t.transcription_id, "processing"),
        "pending",
        "not ready at Bird (status processing)",
        exit_code=0,
    ),
    Case(
        "status-error",
        lambda t: t.sim.transcriptions.set_status(t.transcription_id, "error"),
        "unavailable",
        "gave up",
        exit_code=0,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_hostile_transcription_answer(
    case: Case,
    simulator_factory: SimulatorFactory,
    s3_client: S3Client,
    s3_bucket: str,
    s3_endpoint: str,
    tmp_path: Path,
) -> None:
    sim = simulator_factory(
        recordings=16,
        seed=115,
        available_fraction=1.0,
        media_size_range=(400, 2000),
        transcriptions=True,
    )
    with_one = [rid for rid in sim.dataset.ids if len(sim.transcriptions.for_recording(rid)) == 1]
    assert len(with_one) >= 2
    recording_id = with_one[0]
    (item,) = sim.transcriptions.for_recording(recording_id)
    sim.transcriptions.set_status(item.id, "available")
    sim.transcriptions.set_offers_txt(item.id, True)
    target = Target(sim, recording_id, item.id, mp3_key(sim, recording_id), s3_client, s3_bucket)
    case.setup(target)
    sim.transcriptions.make_ready()  # the other recordings' are all ready

    env = contract_env(tmp_path, sim, s3_bucket, s3_endpoint)
    result = cli_invoker(env)("archive", *with_one[:3])
    assert result.exit_code == case.exit_code, result.output
    assert "Traceback" not in result.output

    engine = create_engine_for(env["RECARCHIVE_DATABASE_URL"])
    try:
        with engine.connect() as connection:
            rows = {
                row["transcription_id"]: dict(row)
                for row in connection.execute(
                    text("SELECT * FROM transcription_ledger WHERE recording_id = :rid"),
                    {"rid": recording_id},
                ).mappings()
            }
            media_state = connection.execute(
                text("SELECT state FROM archive_ledger WHERE recording_id = :rid"),
                {"rid": recording_id},
            ).scalar()
    finally:
        engine.dispose()
    # The recording's own media is archived whatever its transcription did.
    assert media_state == "archived"
    row = rows["*" if case.listing else item.id]
    assert row["state"] == case.state, row
    if case.reason is not None:
        assert case.reason in (row["last_error"] or ""), row
    if case.state == "failed":
        assert case.reason is not None
        assert case.reason in " ".join(result.output.split())  # the summary names it

    listed = s3_client.list_objects_v2(Bucket=s3_bucket, Prefix=target.key.removesuffix(".mp3"))
    keys = {obj["Key"] for obj in listed.get("Contents", []) if ".transcription." in obj["Key"]}
    json_key = transcription_key(target.key, item.id, "json")
    txt_key = transcription_key(target.key, item.id, "txt")
    if case.state == "archived":
        want = {json_key} | ({txt_key} if case.id != "txt-404" else set())
        assert keys == want
        for key in want:
            body = s3_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
            assert body == sim.transcriptions.content(item.id, key.rsplit(".", 1)[1])
        assert row["json_key"] == json_key
        assert row["txt_key"] == (None if case.id == "txt-404" else txt_key)
    elif case.id == "key-holds-other-bytes":
        assert keys == {json_key}  # left as it was, never overwritten
        body = s3_client.get_object(Bucket=s3_bucket, Key=json_key)["Body"].read()
        assert body == OTHER_BYTES
    else:
        assert keys == set()
    secrets = [sim.config.access_key, "X-Amz-Signature", uuid.UUID(item.id).hex[:16]]
    stored = json.dumps(rows, default=str)
    assert [s for s in secrets if s in result.output or s in stored] == []
    assert sim.transcriptions.created == []
