"""Chaos trials: the world misbehaves in the middle of a run; nothing is lost or stored wrong.

* the disk fills up while media downloads (``ENOSPC`` injected into the temp-file writes);
* the S3 endpoint is unreachable for 30 s (a proxy drops every connection);
* PostgreSQL, the ledger, restarts.

Each trial runs a real archive run (the Bird simulator over HTTP, moto's S3 server, a real
database) in-process, lets the fault happen, then recovers the way an operator would — a
``retry-failed`` run, or the same archive run again — and checks every available recording:
``archived``, one object version of the simulator's exact bytes, the ledger equal to S3, no
lease held, no temp file left. docs/reliability.md lists the trials and what they found.
"""

from __future__ import annotations

import asyncio
import errno
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import recarchive.media.spool
from recarchive.config import Settings
from recarchive.errors import StorageUnavailableError
from recarchive.ids.read import collect_ids
from recarchive.media.keys import media_key
from recarchive.media.s3 import MediaStore
from recarchive.model import RunCounts
from recarchive.run.chunk import archive_chunk
from recarchive.run.context import ArchiveContext, ChunkOptions
from recarchive.run.runs import archive_ids, retry_failed
from recarchive.simulator.server import SimulatorServer
from recarchive.store.archive import ArchiveStore
from recarchive.store.engine import create_engine_for
from tests.fixtures.postgres import PostgresServer, find_pg_bin
from tests.fixtures.s3_proxy import Action, FaultProxy, RequestInfo
from tests.fixtures.simulator import SimulatorFactory

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

PREFIX = "recordings"


def settings_for(
    sim: SimulatorServer,
    database_url: str,
    endpoint: str,
    bucket: str,
    tmp: Path,
    *,
    requests_per_second: float = 40,
) -> Settings:
    temp = tmp / "temp"
    temp.mkdir(exist_ok=True)
    return Settings(
        bird_api_url=sim.api_url,
        bird_access_key=sim.config.access_key,
        workspace_id=sim.config.workspace_id,
        database_url=database_url,
        parquet_root=str(tmp / "parquet"),
        s3_bucket=bucket,
        s3_endpoint_url=endpoint,
        requests_per_second=requests_per_second,
        concurrency=4,
        chunk_size=10,
        temp_dir=str(temp),
    )


async def archive(settings: Settings, sim: SimulatorServer, tmp: Path) -> Any:
    with collect_ids(sim.dataset.ids, spool_dir=str(tmp)) as ids:
        return await archive_ids(settings, ids, ChunkOptions())


def assert_all_archived_once(
    settings: Settings, sim: SimulatorServer, s3_client: S3Client, bucket: str
) -> None:
    """Every available recording archived: one version, the simulator's bytes, ledger == S3."""
    media = MediaStore(s3_client, bucket=bucket)
    engine = create_engine_for(settings.database_url)
    try:
        entries = ArchiveStore(engine).get_entries(sim.dataset.ids)
    finally:
        engine.dispose()
    versions = Counter(
        version["Key"]
        for version in s3_client.list_object_versions(Bucket=bucket).get("Versions", [])
        if version["Key"].endswith(".mp3")
    )
    for recording_id in sim.dataset.available_ids():
        payload = sim.dataset.payload(recording_id)
        assert payload is not None
        created = datetime.fromisoformat(payload["createdAt"].replace("Z", "+00:00"))
        key = media_key(PREFIX, sim.config.workspace_id, recording_id, created)
        entry = entries[recording_id]
        assert entry.state == "archived", (recording_id, entry.state, entry.last_error)
        assert entry.lease_owner is None
        assert versions[key] == 1, f"{key} stored {versions[key]} times"
        size, digest = media.hash_object(key)
        assert digest == sim.dataset.media(recording_id).sha256() == entry.sha256
        assert (entry.s3_key, entry.size_bytes) == (key, size)
    assert sum(versions.values()) == len(sim.dataset.available_ids())
    assert media.list_open_multipart_uploads() == []
    assert list(Path(str(settings.temp_dir)).iterdir()) == []


@pytest.fixture
def versioned_bucket(s3_client: S3Client, s3_bucket: str) -> str:
    s3_client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    return s3_bucket


@pytest.mark.parametrize("writes_before_full", [1, 6, 15], ids=lambda n: f"full-after-{n}")
async def test_disk_full_while_downloading_stops_clearly_and_loses_nothing(
    writes_before_full: int,
    simulator_factory: SimulatorFactory,
    s3_endpoint: str,
    s3_client: S3Client,
    versioned_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim = simulator_factory(recordings=20, seed=900 + writes_before_full, available_fraction=1.0)
    settings = settings_for(
        sim, f"sqlite:///{tmp_path / 'archive.db'}", s3_endpoint, versioned_bucket, tmp_path
    )
    real = recarchive.media.spool._write_and_hash
    writes = Counter[str]()
    # Every body through a temp file: small ones are kept in memory otherwise.
    monkeypatch.setattr(recarchive.media.spool, "MEMORY_BODY_BYTES", 0)

    def filling_disk(handle: Any, digest: Any, chunk: bytes) -> None:
        writes["n"] += 1
        if writes["n"] > writes_before_full:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(handle, digest, chunk)

    monkeypatch.setattr(recarchive.media.spool, "_write_and_hash", filling_disk)
    with pytest.raises(StorageUnavailableError, match="No space left on device"):
        await archive(settings, sim, tmp_path)
    monkeypatch.setattr(recarchive.media.spool, "_write_and_hash", real)  # space freed
    report = await retry_failed(settings)
    assert report.counts.failed == 0, report.counts.failures
    assert_all_archived_once(settings, sim, s3_client, versioned_bucket)


async def test_s3_unreachable_for_30_seconds_mid_run(
    simulator_factory: SimulatorFactory,
    s3_fault_proxy: FaultProxy,
    s3_client: S3Client,
    versioned_bucket: str,
    tmp_path: Path,
) -> None:
    # Seven chunks of six recordings, one starting every 6 s: S3 is gone for 30 s from the
    # run's first upload on, so chunks meet the outage at its start, inside it, and after it.
    sim = simulator_factory(recordings=42, seed=931, available_fraction=1.0)
    settings = settings_for(
        sim, f"sqlite:///{tmp_path / 'archive.db'}", s3_fault_proxy.url, versioned_bucket, tmp_path
    ).model_copy(update={"chunk_size": 6})
    outage: list[float] = []

    def unreachable_for_30s(request: RequestInfo) -> Action:
        now = time.monotonic()
        if not outage and request.method == "PUT":
            outage.append(now)
        return "drop_before" if outage and now - outage[0] < 30 else "pass"

    async def one_chunk_every_6s(
        ctx: ArchiveContext, chunk: list[str], options: ChunkOptions
    ) -> RunCounts:
        if outage:
            await asyncio.sleep(6)
        return await archive_chunk(ctx, chunk, options)

    s3_fault_proxy.schedule = unreachable_for_30s
    with collect_ids(sim.dataset.ids, spool_dir=str(tmp_path)) as ids:
        first = await archive_ids(settings, ids, ChunkOptions(), run_chunk=one_chunk_every_6s)
    assert outage and time.monotonic() - outage[0] > 30, "the run outlived the outage"
    # Items were retried (botocore), failed with a reason, or archived once S3 was back;
    # nothing was stored wrong (checked below after the rerun).
    assert first.counts.archived > 0 and first.counts.failed > 0, first.counts
    assert first.counts.archived + first.counts.failed == len(sim.dataset.available_ids())
    assert all("TransportError" in error for _, error in first.counts.failures)
    assert s3_fault_proxy.faults() > first.counts.failed  # more dropped requests than failures
    second = await archive(settings, sim, tmp_path)  # the same run again
    assert second.counts.failed == 0, second.counts.failures
    assert_all_archived_once(settings, sim, s3_client, versioned_bucket)


@pytest.fixture
def own_postgres() -> Iterator[tuple[PostgresServer, str]]:
    """A PostgreSQL server of this test's own (it is restarted mid-run), and its URL."""
    bin_dir = find_pg_bin()
    assert bin_dir is not None, "PostgreSQL binaries missing (scripts/bootstrap --postgres)"
    server = PostgresServer(bin_dir)
    try:
        yield server, server.start()
    finally:
        server.stop()


@pytest.mark.postgres
@pytest.mark.parametrize("restart_after", [2, 12], ids=lambda n: f"restart-after-{n}-downloads")
async def test_postgres_restarted_mid_run(
    restart_after: int,
    own_postgres: tuple[PostgresServer, str],
    simulator_factory: SimulatorFactory,
    s3_endpoint: str,
    s3_client: S3Client,
    versioned_bucket: str,
    tmp_path: Path,
) -> None:
    sim = simulator_factory(recordings=30, seed=960, available_fraction=1.0)
    server, url = own_postgres
    settings = settings_for(sim, url, s3_endpoint, versioned_bucket, tmp_path)
    restarted = threading.Event()

    def restart() -> None:
        deadline = time.monotonic() + 30
        while len(sim.media_requests()) < restart_after and time.monotonic() < deadline:
            time.sleep(0.01)
        done = server._run(
            "pg_ctl", "-D", str(server.data), "-l", str(server.log), "-m", "fast", "-w", "restart"
        )
        assert done.returncode == 0, done.stderr
        restarted.set()

    thread = threading.Thread(target=restart)
    thread.start()
    try:
        await archive(settings, sim, tmp_path)
        outcome = "survived"
    except StorageUnavailableError as exc:
        outcome = f"stopped: {exc}"
    finally:
        await asyncio.to_thread(thread.join, 60)
    assert restarted.is_set()
    print(f"restart after {restart_after} downloads: {outcome}")
    report = await archive(settings, sim, tmp_path)  # the rerun of the same input
    assert report.counts.failed == 0, report.counts.failures
    assert_all_archived_once(settings, sim, s3_client, versioned_bucket)
