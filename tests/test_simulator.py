"""The simulator itself: dataset coverage and determinism, MP3 bytes, faults, the CLI, and
what it offers to measure a run: latency, missing IDs, the ID listing, the request counts."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from recarchive.cli.app import app
from recarchive.simulator.dataset import STATUSES, ZERO_DATE, Dataset
from recarchive.simulator.faults import FaultProfile, UnknownFaultError
from recarchive.simulator.mp3 import FRAME_HEADER, Mp3Source
from recarchive.simulator.server import SimulatorServer
from tests.fixtures.postgres import free_port
from tests.fixtures.simulator import SimulatorFactory

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


def _simulate_command(port: int, media_port: int, *options: str) -> list[str]:
    """``recarchive simulate`` on the given ports, with ``options``."""
    ports = ["--port", str(port), "--media-port", str(media_port)]
    return [str(Path(sys.executable).parent / "recarchive"), "simulate", *ports, *options]


def test_simulate_command_serves_the_endpoints(tmp_path: Path) -> None:
    port, media_port = free_port(), free_port()
    options = ["--recordings", "25", "--seed", "3", "--faults", "none", "--access-key", "k-123"]
    command = _simulate_command(port, media_port, *options)
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


# --- measuring: latency, missing IDs, the ID listing, the request counts ----------------------


def _recordings_url(sim: SimulatorServer) -> str:
    return f"{sim.api_url}/workspaces/{sim.config.workspace_id}/recordings"


def _auth(sim: SimulatorServer) -> dict[str, str]:
    return {"Authorization": f"AccessKey {sim.config.access_key}"}


def _stats(sim: SimulatorServer) -> dict[str, Any]:
    # No key: the simulator's own endpoints are open on loopback.
    response = httpx.get(f"{sim.api_url}/_sim/stats")
    assert response.status_code == 200
    stats: dict[str, Any] = response.json()
    return stats


async def test_latency_delays_every_api_request_without_serialising_them(
    simulator_factory: SimulatorFactory,
) -> None:
    latency, concurrent = 0.5, 12
    sim = simulator_factory(recordings=5, seed=4, latency_seconds=latency)
    url = f"{_recordings_url(sim)}/{sim.dataset.ids[0]}"

    async def timed(client: httpx.AsyncClient) -> float:
        started = time.monotonic()
        response = await client.get(url, headers=_auth(sim))
        assert response.status_code == 200
        return time.monotonic() - started

    started = time.monotonic()
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrent)) as client:
        durations = await asyncio.gather(*(timed(client) for _ in range(concurrent)))
    elapsed = time.monotonic() - started
    assert min(durations) >= latency
    assert elapsed < 3 * latency, f"{concurrent} requests took {elapsed:.2f} s: served in turn?"
    # The simulator's own endpoints answer at once.
    started = time.monotonic()
    _stats(sim)
    assert time.monotonic() - started < latency


@pytest.mark.parametrize(
    ("recordings", "fraction"),
    [(60, 0.0), (60, 0.25), (20, 1.0)],
    ids=["none-missing", "a-quarter-missing", "all-missing"],
)
def test_missing_fraction_is_seeded_and_covers_every_id(recordings: int, fraction: float) -> None:
    first = Dataset(recordings, 5, workspace_id="ws", missing_fraction=fraction)
    again = Dataset(recordings, 5, workspace_id="ws", missing_fraction=fraction)
    assert (first.ids, first.missing_ids) == (again.ids, again.missing_ids)
    assert sorted(first.all_ids) == sorted(first.ids + first.missing_ids)
    assert len(set(first.all_ids)) == recordings
    assert not set(first.ids) & set(first.missing_ids)
    assert all(first.payload(rid) is None for rid in first.missing_ids)
    if fraction == 0.0:
        # Without missing IDs the dataset is the one it always was.
        assert first.ids == first.all_ids == Dataset(recordings, 5, workspace_id="ws").ids
    elif fraction == 1.0:
        assert first.ids == []
    else:
        assert 0 < len(first.missing_ids) < recordings


def test_missing_ids_answer_404_and_are_listed_only_at_sim_ids(
    simulator_factory: SimulatorFactory,
) -> None:
    sim = simulator_factory(recordings=40, seed=6, missing_fraction=0.3)
    assert sim.dataset.missing_ids, "seed 6 draws no missing ID: pick another seed"
    base, headers = _recordings_url(sim), _auth(sim)
    for recording_id in sim.dataset.missing_ids:
        for suffix in ("", ".mp3"):
            answer = httpx.get(f"{base}/{recording_id}{suffix}", headers=headers)
            assert answer.status_code == 404, (recording_id, suffix)
    assert httpx.get(f"{base}/{sim.dataset.ids[0]}", headers=headers).status_code == 200
    listed = httpx.get(base, params={"limit": 99}, headers=headers).json()["results"]
    assert {r["id"] for r in listed} == set(sim.dataset.ids)
    ids = httpx.get(f"{sim.api_url}/_sim/ids")
    assert ids.status_code == 200 and ids.headers["Content-Type"].startswith("text/plain")
    assert ids.text.splitlines() == sim.dataset.all_ids
    assert len(sim.dataset.all_ids) == 40


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--recordings", "37", "--seed", "9"],
        ["--recordings", "50", "--seed", "2", "--missing-fraction", "0.2"],
    ],
    ids=["defaults", "seeded", "with-missing"],
)
def test_simulate_list_ids_prints_every_id_and_exits(args: list[str]) -> None:
    result = CliRunner().invoke(app, ["simulate", "--list-ids", *args])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    options = dict(zip(args[::2], args[1::2], strict=True))
    expected = Dataset(
        int(options.get("--recordings", "300")),
        int(options.get("--seed", "1")),
        workspace_id="ws",
        missing_fraction=float(options.get("--missing-fraction", "0")),
    )
    assert lines == expected.all_ids
    assert len(lines) == len(set(lines)) == int(options.get("--recordings", "300"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--media-size-min", "0"], "media sizes must be positive"),
        (["--media-size-min", "500", "--media-size-max", "400"], "500-400"),
        (["--latency", "-0.5"], "latency must not be negative: -0.5"),
        (["--missing-fraction", "1.5"], "missing fraction must be between 0 and 1: 1.5"),
        (["--rate-limit", "0"], "rate limit must be positive: 0.0"),
        (["--faults", "500,explode"], "unknown fault 'explode'"),
    ],
    ids=["size-zero", "min-above-max", "negative-latency", "fraction-above-1", "rate-0", "fault"],
)
def test_simulate_refuses_bad_options_with_one_line_and_exit_2(
    args: list[str], message: str
) -> None:
    # --list-ids too: should a check be missing, the command prints and exits, never serves.
    result = CliRunner().invoke(app, ["simulate", "--list-ids", *args])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_media_size_range_bounds_every_recording(simulator_factory: SimulatorFactory) -> None:
    sim = simulator_factory(recordings=30, seed=8, media_size_range=(5_000, 6_000))
    sizes = [sim.dataset.media(rid).size for rid in sim.dataset.ids]
    assert all(5_000 <= size <= 6_000 for size in sizes) and len(set(sizes)) > 1


def test_stats_count_api_requests_by_status_and_peak_second(
    simulator_factory: SimulatorFactory,
) -> None:
    sim = simulator_factory(recordings=10, seed=3)
    base, headers = _recordings_url(sim), _auth(sim)
    available = sim.dataset.available_ids()[:2]
    with httpx.Client() as client:
        for recording_id in sim.dataset.ids[:6]:
            assert client.get(f"{base}/{recording_id}", headers=headers).status_code == 200
        assert client.get(f"{base}/{sim.dataset.ids[0]}").status_code == 401
        for recording_id in (*available, available[0]):
            redirect = client.get(f"{base}/{recording_id}.mp3", headers=headers)
            assert client.get(redirect.headers["Location"]).status_code == 200
        # A range GET is a size probe, not a download.
        probe = client.get(f"{base}/{available[1]}.mp3", headers=headers).headers["Location"]
        assert client.get(probe, headers={"Range": "bytes=0-0"}).status_code == 206
        first = _stats(sim)
        time.sleep(1.1)
        client.get(base, headers=headers)
    api, media = first["api"], first["media"]
    assert api["requests"] == 11 == sum(api["per_second"].values())
    assert api["by_status"] == {"200": 6, "307": 4, "401": 1}
    assert api["rate_limited"] == 0
    assert api["peak_per_second"] == 11  # all of them within one second
    assert media["requests"] == 4 and media["by_status"] == {"200": 3, "206": 1}
    assert media["downloads"] == 3 and media["distinct_downloads"] == 2
    assert media["repeated_downloads"] == {available[0]: 2}
    later = _stats(sim)
    assert later["api"]["requests"] == 12 and later["api"]["peak_per_second"] == 11
    assert len(later["api"]["per_second"]) == 2
    # /_sim/ requests are neither counted nor logged.
    assert len(sim.api_requests()) == 12
    sim.clear_requests()
    assert _stats(sim)["api"]["requests"] == 0


def test_stats_count_the_rate_limiters_429s(simulator_factory: SimulatorFactory) -> None:
    sim = simulator_factory(recordings=5, seed=3, rate_limit=2)
    url = f"{_recordings_url(sim)}/{sim.dataset.ids[0]}"
    with httpx.Client() as client:
        statuses = [client.get(url, headers=_auth(sim)).status_code for _ in range(8)]
    stats = _stats(sim)["api"]
    assert stats["requests"] == 8 and stats["peak_per_second"] == 8
    assert stats["rate_limited"] == statuses.count(429) >= 6
    assert stats["by_status"] == {str(s): statuses.count(s) for s in sorted(set(statuses))}


def test_simulate_writes_its_stats_file_when_terminated(tmp_path: Path) -> None:
    port, stats_file = free_port(), tmp_path / "stats.json"
    command = _simulate_command(
        port, free_port(), "--recordings", "5", "--stats-file", str(stats_file)
    )
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        process.stdout.readline()  # the banner: the server is up
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 401
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert process.returncode == 0
    stats = json.loads(stats_file.read_text())
    assert stats["api"]["requests"] == 1 and stats["api"]["by_status"] == {"401": 1}
