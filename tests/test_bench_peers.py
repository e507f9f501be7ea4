"""``bench.peers``' bare contenders do the work they are timed for (no dlt, a few seconds)."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from bench import peer_loops
from bench.peer_dlt import dlt_python
from bench.peers import Contender, Run, Work, table
from mypy_boto3_s3 import S3Client

from recarchive.media.keys import media_key, sidecar_key
from recarchive.simulator.server import SimulatorServer
from tests.fixtures.simulator import SimulatorFactory


def _config(sim: SimulatorServer, tmp_path: Path, ids: list[str], **extra: str) -> dict[str, str]:
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join(ids))
    return {
        "api_url": sim.api_url,
        "workspace_id": sim.config.workspace_id,
        "access_key": sim.config.access_key,
        "concurrency": "4",
        "ids_file": str(ids_file),
        **extra,
    }


def _api_requests(sim: SimulatorServer) -> int:
    return int(httpx.get(f"{sim.api_url}/_sim/stats").json()["api"]["requests"])


@pytest.mark.parametrize("kind", ["httpx", "aiohttp"])
async def test_metadata_loop_gets_every_id_once(
    simulator: SimulatorServer, tmp_path: Path, kind: str
) -> None:
    ids = list(simulator.dataset.ids[:10])
    loop = peer_loops.LOOPS[kind]
    size = await loop(_config(simulator, tmp_path, ids), ids)
    expected = sum(len(json.dumps(simulator.dataset.payload(rid)).encode()) for rid in ids)
    assert size > expected * 0.8  # the JSON bodies were read, not just the headers
    assert _api_requests(simulator) == len(ids)


async def test_media_loop_stores_what_the_pipeline_stores(
    simulator_factory: SimulatorFactory,
    s3_endpoint: str,
    s3_client: S3Client,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    sim = simulator_factory(
        recordings=6, seed=3, available_fraction=1.0, media_size_range=(3000, 3300)
    )
    ids = list(sim.dataset.ids)
    config = _config(sim, tmp_path, ids, s3_endpoint=s3_endpoint, bucket=s3_bucket)
    size = await peer_loops.media(config, ids)
    assert size == sum(len(sim.dataset.media_bytes(rid)) for rid in ids)
    # Per recording: metadata GET, .mp3 GET (307); one download each from the media host.
    assert _api_requests(sim) == 2 * len(ids)
    for recording_id in ids:
        payload = sim.dataset.payload(recording_id)
        assert payload is not None
        created = datetime.fromisoformat(payload["createdAt"].replace("Z", "+00:00"))
        key = media_key("recordings", sim.config.workspace_id, recording_id, created)
        stored = s3_client.get_object(Bucket=s3_bucket, Key=key)
        body = stored["Body"].read()
        assert body == sim.dataset.media_bytes(recording_id)
        assert stored["Metadata"]["sha256"] == hashlib.sha256(body).hexdigest()
        sidecar = s3_client.get_object(Bucket=s3_bucket, Key=sidecar_key(key))
        assert json.loads(sidecar["Body"].read())["id"] == recording_id


def test_table_gives_recarchive_over_each_peer() -> None:
    work = Work("4 metadata GETs", "metadata", ["a", "b", "c", "d"], "rec", False)

    def runs(*seconds: float) -> list[Run]:
        return [Run(s, s / 2, 4, {}, 4) for s in seconds]

    text = table([(work, [Contender("ours", runs(1.0, 2.0)), Contender("peer", runs(3.0))])])
    ours, peer = text.splitlines()[2:]
    # Medians: ours 3.0 rec/s (of 4.0 and 2.0), 187.5 ms/rec (of 125 and 250); the peer 1.33.
    assert "| 3.0 rec/s | 187.50 ms/rec | 4.0, 2.0 |  |  |" in ours
    assert peer.endswith("| 1.3 rec/s | 375.00 ms/rec | 1.3 | 2.25 | 0.50 |")


def test_dlt_that_cannot_be_installed_stops_the_bench_with_a_reason(tmp_path: Path) -> None:
    # A venv where none can be made: the bench stops before any server starts, saying why.
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(SystemExit, match=r"(?s)could not install 'dlt\[parquet\]'.*--skip-dlt"):
        dlt_python(blocked / "venv")
