"""The simulator itself: dataset coverage and determinism, MP3 bytes, faults, the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from recarchive.simulator.dataset import STATUSES, ZERO_DATE, Dataset
from recarchive.simulator.faults import FaultProfile, UnknownFaultError
from recarchive.simulator.mp3 import FRAME_HEADER, Mp3Source
from tests.fixtures.postgres import free_port

#: The example payload of the user's source document ("Get a Recording"), copied verbatim.
SEED_EXAMPLE = Path(__file__).parent / "data" / "seed_recording.json"
SEED_FIELDS = {
    "id",
    "source",
    "sourceId",
    "channelId",
    "status",
    "direction",
    "originator",
    "receiver",
    "origin",
    "duration",
    "stereo",
    "format",
    "transcription",
    "conferenceId",
    "url",
    "roomInfoUrl",
    "createdAt",
    "updatedAt",
    "endedAt",
    "startedAt",
}


def test_simulated_payloads_have_the_seed_documents_shape() -> None:
    example = json.loads(SEED_EXAMPLE.read_text())
    assert set(example) == SEED_FIELDS
    dataset = Dataset(40, 1, workspace_id="ws")
    full = [p for p in map(dataset.payload, dataset.ids) if p and set(SEED_FIELDS) <= set(p)]
    assert full, "no simulated payload carries every field of the seed document"
    for payload in full:
        for field, value in example.items():
            if value is not None and payload[field] is not None:
                assert type(payload[field]) is type(value), field
        for role in ("originator", "receiver"):
            if payload[role] and payload[role].get("contact"):
                assert set(payload[role]["contact"]) == set(example[role]["contact"])


def test_dataset_is_deterministic() -> None:
    first = Dataset(50, 42, workspace_id="ws")
    second = Dataset(50, 42, workspace_id="ws")
    other = Dataset(50, 43, workspace_id="ws")
    assert first.ids == second.ids and first.ids != other.ids
    assert all(first.payload(i) == second.payload(i) for i in first.ids)
    assert first.media(first.ids[0]).sha256() == second.media(first.ids[0]).sha256()


def test_dataset_covers_every_field_shape() -> None:
    dataset = Dataset(400, 1, workspace_id="ws", available_fraction=0.6)
    payloads = [dataset.payload(i) for i in dataset.ids]
    assert all(p is not None for p in payloads)
    seen = [p for p in payloads if p is not None]
    assert {p["status"] for p in seen} >= set(STATUSES) | {"transcribing"}
    assert any(p.get("endedAt") == ZERO_DATE for p in seen)
    assert any("channelId" not in p for p in seen)
    assert any("channelId" in p and p["channelId"] is None for p in seen)
    assert any(p["source"] == "conference" and p["conferenceId"] for p in seen)
    assert any(
        (p.get("originator") or {}).get("number", {}) and p["originator"]["number"]["anonymous"]
        for p in seen
    )
    assert any(p.get("receiver") is None for p in seen)
    assert any(set(p) - SEED_FIELDS for p in seen)  # unknown extra fields
    months = {p["createdAt"][:7] for p in seen}
    assert len(months) >= 5
    for p in seen:
        assert set(p) <= SEED_FIELDS | {"sentiment", "tags"}
        datetime.fromisoformat(p["createdAt"].replace("Z", "+00:00"))


@pytest.mark.parametrize("size", [4_000, 65_537, 3_000_001])
@pytest.mark.parametrize("with_id3", [True, False])
def test_media_is_mpeg_audio_of_the_exact_size(size: int, with_id3: bool) -> None:
    source = Mp3Source("abc", size, with_id3=with_id3)
    data = source.read_all()
    assert len(data) == size
    assert data.startswith(b"ID3") if with_id3 else data.startswith(FRAME_HEADER)
    if with_id3:
        tag_size = 10 + int.from_bytes(bytes(b & 0x7F for b in data[6:10]), "big")
        assert data[tag_size : tag_size + 2] == FRAME_HEADER[:2]


def test_fault_profiles_parse_and_reject_unknown_names() -> None:
    assert FaultProfile.parse("chaos", 1).faults >= {"429", "500", "truncate", "expired"}
    assert FaultProfile.parse("500, slow", 1).faults == {"500", "slow"}
    with pytest.raises(UnknownFaultError, match="'explode'"):
        FaultProfile.parse("500,explode", 1)


def test_faults_are_deterministic_and_never_permanent() -> None:
    profile = FaultProfile.parse("500", 9)
    keys = [f"meta:{n}" for n in range(500)]
    hits = [k for k in keys if profile.hits("500", k, 0)]
    assert hits == [k for k in keys if FaultProfile.parse("500", 9).hits("500", k, 0)]
    assert 0.05 < len(hits) / len(keys) < 0.15
    assert not any(profile.hits("500", k, 2) for k in keys)


def test_simulate_command_serves_the_endpoints(tmp_path: Path) -> None:
    port, media_port = free_port(), free_port()
    command = [
        str(Path(sys.executable).parent / "recarchive"),
        "simulate",
        "--port",
        str(port),
        "--media-port",
        str(media_port),
        "--recordings",
        "25",
        "--seed",
        "3",
        "--faults",
        "none",
        "--access-key",
        "k-123",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline() + process.stdout.readline()
        workspace = re.search(r"workspace (\S+),", banner)
        assert workspace, banner
        base = f"http://127.0.0.1:{port}/workspaces/{workspace.group(1)}/recordings"
        headers = {"Authorization": "AccessKey k-123"}
        deadline = time.monotonic() + 10
        while True:
            try:
                listing = httpx.get(base, params={"limit": 99}, headers=headers)
                break
            except httpx.ConnectError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert listing.status_code == 200
        results = listing.json()["results"]
        assert len(results) == 25 and "nextPageToken" not in listing.json()
        one = httpx.get(f"{base}/{results[0]['id']}", headers=headers).json()
        assert set(one) <= SEED_FIELDS | {"sentiment", "tags"} and {"id", "status"} <= set(one)
        assert (
            httpx.get(
                f"{base}/{results[0]['id']}", headers={"Authorization": "Bearer nope"}
            ).status_code
            == 401
        )
        available = next(r for r in results if r["status"] == "available")
        redirect = httpx.get(f"{base}/{available['id']}.mp3", headers=headers)
        assert redirect.status_code == 307
        assert redirect.headers["Location"].startswith(f"http://127.0.0.1:{media_port}/")
        media = httpx.get(redirect.headers["Location"])
        assert media.status_code == 200 and media.headers["Content-Type"] == "audio/mpeg"
        assert int(media.headers["Content-Length"]) == len(media.content)
    finally:
        process.terminate()
        process.wait(timeout=10)
