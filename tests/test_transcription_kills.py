"""Crash safety of transcriptions: ``recarchive archive`` SIGKILLed amid their uploads, rerun.

The real console script runs as a child process against the in-process simulator (its
transcriptions on, all ready, slow answers now and then) and moto with a *versioned* bucket.
It is killed with SIGKILL a seeded moment after its first transcription content request, so
nothing unwinds; then ``recarchive retry-failed`` runs to completion (the killed run
registered every ID first, and its unfinished rows are due once it is dead). Then every
available transcription is in S3 exactly once (one version per key, the simulator's bytes),
the ledger says ``archived`` for each with the same hashes, and every MP3 is stored once.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from recarchive.simulator.server import SimulatorServer
from tests.fixtures.cli import contract_env
from tests.fixtures.s3 import AWS_ENV
from tests.fixtures.simulator import SimulatorFactory
from tests.test_kill_trials import Trial, killed_at_the_end
from tests.test_transcriptions import (
    content_requests,
    expected_objects,
    ledger_rows,
    transcriptions_of,
)

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

pytestmark = pytest.mark.timeout(120)

TRIALS = 4
RECORDINGS = 30


@pytest.fixture
def trial(
    simulator_factory: SimulatorFactory,
    s3_endpoint: str,
    s3_client: S3Client,
    s3_bucket: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Trial:
    number = int(request.node.callspec.params["number"])
    s3_client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    sim = simulator_factory(
        recordings=RECORDINGS,
        seed=1500 + number,
        faults="slow",
        available_fraction=1.0,
        media_size_range=(20_000, 200_000),
        transcriptions=True,
    )
    sim.transcriptions.make_ready()
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join(sim.dataset.ids) + "\n")
    temp_dir = tmp_path / "temp"
    temp_dir.mkdir()
    env = {
        **{name: value for name, value in os.environ.items() if not name.startswith("RECARCHIVE_")},
        **AWS_ENV,
        **contract_env(tmp_path, sim, s3_bucket, s3_endpoint),
        # Paced and narrow: the transcriptions' requests spread over a few seconds.
        "RECARCHIVE_REQUESTS_PER_SECOND": "15",
        "RECARCHIVE_CONCURRENCY": "3",
        "RECARCHIVE_TEMP_DIR": str(temp_dir),
    }
    return Trial(sim, env, ids_file, temp_dir, tmp_path)


def _wait_for_content_request(sim: SimulatorServer, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while not content_requests(sim):
        assert process.poll() is None, "the run ended before any transcription"
        assert time.monotonic() < deadline, "no transcription content request within 60 s"
        time.sleep(0.005)


@pytest.mark.parametrize("number", range(TRIALS))
def test_sigkill_amid_transcription_uploads_then_every_one_is_stored_once(
    number: int, trial: Trial, s3_client: S3Client, s3_bucket: str
) -> None:
    sim = trial.sim
    expected = expected_objects(sim)
    assert len(expected) >= 8
    delay = random.Random(15_000 + number).uniform(0, 1.2) * (number + 1) / TRIALS
    with killed_at_the_end(trial.start("first.log")) as first:
        _wait_for_content_request(sim, first)
        time.sleep(delay)
    assert first.returncode == -signal.SIGKILL, trial.output("first.log")
    listed = s3_client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])
    stored_first = {obj["Key"] for obj in listed if ".transcription." in obj["Key"]}
    recorded = {
        row[f"{fmt}_key"]
        for row in ledger_rows(trial.env["RECARCHIVE_DATABASE_URL"]).values()
        for fmt in ("json", "txt")
        if row["state"] == "archived"
    }
    # Objects the killed run stored but did not record: the redo must adopt them.
    unrecorded = stored_first - recorded

    second = trial.start("second.log", "retry-failed")
    assert second.wait(timeout=90) == 0, trial.output("second.log")
    print(
        f"trial {number}: killed {delay:.2f} s after the first content request, with "
        f"{len(stored_first)} of {len(expected)} transcription objects stored, "
        f"{len(unrecorded)} of them not recorded yet"
    )

    versions = s3_client.list_object_versions(Bucket=s3_bucket)
    assert versions.get("DeleteMarkers", []) == []
    counted = Counter(v["Key"] for v in versions.get("Versions", []))
    transcription_keys = {key for key in counted if ".transcription." in key}
    assert transcription_keys == set(expected)
    for key, data in expected.items():
        assert counted[key] == 1, f"{key} was written {counted[key]} times"
        body = s3_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        assert body == data
    assert all(counted[key] == 1 for key in counted if key.endswith(".mp3"))
    assert sum(1 for key in counted if key.endswith(".mp3")) == len(sim.dataset.ids)
    rows = ledger_rows(trial.env["RECARCHIVE_DATABASE_URL"])
    for recording_id, items in transcriptions_of(sim).items():
        for item in items:
            row = rows[(recording_id, item.id)]
            if item.status == "available":
                assert row["state"] == "archived", row
                digest = hashlib.sha256(sim.transcriptions.content(item.id, "json") or b"")
                assert row["json_sha256"] == digest.hexdigest()
            else:
                assert row["state"] == "unavailable", row
    assert "*" not in {tid for _, tid in rows}
    assert sim.transcriptions.created == []
