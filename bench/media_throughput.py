"""Media throughput of the pipeline vs bare loops, and peak memory of one 500 MB recording.

Run: ``.venv/bin/python -m bench.media_throughput [--recordings 200] [--size-mb 2 | --size-kb 3]
[--concurrency 16] [--rounds 3] [--big-mb 500] [--loops bare,same-media,media,same,pipeline]``.
Small recordings: ``--recordings 2000 --size-kb 3 --big-mb 0``.

The Bird simulator and moto's S3 server each run in their own process (the machine has two
cores; the client process takes the rest). Loops, same concurrency, same endpoints, rounds
alternating, medians of each:

- ``bare``: httpx GET of ``.mp3`` (307), GET of the presigned URL into memory, boto3
  ``put_object`` in a thread (the plain GET → ``put_object`` loop).
- ``same-media``: the requests of the media path — redirect GET, media GET, checksummed
  conditional PUT, verifying HEAD, sidecar PUT — bare (in memory, one thread hop for S3).
- ``media``: :func:`recarchive.media.transfer.archive_media` per recording (the same requests
  through the real Bird client and media store; no metadata, no SQL).
- ``same``: every request the pipeline makes per recording: the metadata GET, then those of
  ``same-media``.
- ``pipeline``: :func:`recarchive.run.runs.archive_ids` (metadata GET, normalize, SQL upsert
  and ledger, the media path, ledger mark).

Printed: rec/s, MB/s, CPU seconds of client, simulator and S3 server per round, the client's
CPU per recording and per MB, and the ratios media / same-media, pipeline / same and
pipeline / bare. Then one recording of ``--big-mb`` archived by the pipeline in a child
process: its peak RSS (``VmHWM``) and the RSS it had before the download (target: peak
<= 200 MB).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
from botocore.config import Config

# Imported before any timing: the first import of the pipeline's modules takes about a second.
from bench.peer_loops import put_media
from bench.sim_process import free_port
from recarchive.bird.http import build_http_client
from recarchive.config import Settings
from recarchive.ids.read import collect_ids
from recarchive.media.transfer import archive_media
from recarchive.run.clients import build_bird_client, build_bird_http, build_media_store
from recarchive.run.context import ChunkOptions
from recarchive.run.database import open_store
from recarchive.run.runs import archive_ids

MB = 1_000_000
MiB = 1024 * 1024
ACCESS_KEY = "bench-access-key"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}

# The simulator child: serves ``recordings`` available recordings of the given sizes; the
# first one gets ``big`` bytes when big > 0. Prints its ports, then serves until stdin closes.
_SIM_CHILD = r"""
import json, sys
from recarchive.simulator.server import SimulatorConfig, SimulatorServer
recordings, low, high, big = (int(arg) for arg in sys.argv[1:5])
key = sys.argv[5]
server = SimulatorServer(SimulatorConfig(
    recordings=recordings, seed=5, media_size_range=(low, high), available_fraction=1.0,
    access_key=key, url_ttl_seconds=3600,
)).start()
ids = server.dataset.ids
if big:
    server.dataset.set_media_size(ids[0], big)
print(json.dumps({"api": server.api_url, "media": server.media_url,
                  "workspace": server.config.workspace_id, "ids": ids}), flush=True)
sys.stdin.read()
server.stop()
"""


@dataclass(frozen=True)
class Sim:
    api_url: str
    media_url: str
    workspace_id: str
    ids: list[str]
    pid: int = 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (from ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def simulator(recordings: int, low: int, high: int, big: int = 0) -> Iterator[Sim]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _SIM_CHILD,
            str(recordings),
            str(low),
            str(high),
            str(big),
            ACCESS_KEY,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        info = json.loads(process.stdout.readline())
        yield Sim(info["api"], info["media"], info["workspace"], info["ids"], process.pid)
    finally:
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@contextmanager
def moto_server() -> Iterator[tuple[str, int]]:
    port = free_port()
    env = {**os.environ, **AWS_ENV}
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/moto-api/", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.2)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=10)


def _s3(endpoint: str, pool: int) -> Any:
    config = Config(
        retries={"mode": "standard"},
        max_pool_connections=pool,
        request_checksum_calculation="when_supported",
        s3={"addressing_style": "path"},
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


# --- bare loop -------------------------------------------------------------------------------


async def bare_loop(
    sim: Sim,
    endpoint: str,
    bucket: str,
    concurrency: int,
    *,
    same_requests: bool = False,
    metadata: bool = False,
) -> tuple[float, int]:
    """Return (seconds, bytes) of GET via redirect + put_object for every ID.

    With ``same_requests`` the loop also makes the S3 requests the pipeline's contract needs
    (checksummed conditional PUT, verifying HEAD, sidecar PUT), so the ratio
    against it isolates the pipeline's own overhead from the S3 server's cost per request;
    with ``metadata`` it GETs each recording's metadata first, as the pipeline does.
    """
    _s3(endpoint, 4).create_bucket(Bucket=bucket)
    # The clock starts before the clients are built, as the pipeline's does.
    started = time.perf_counter()
    s3 = _s3(endpoint, max(concurrency * 2, 10))
    http = build_http_client(timeout_seconds=60, max_connections=concurrency * 2)
    headers = {"Authorization": f"AccessKey {ACCESS_KEY}"}
    base = f"{sim.api_url}/workspaces/{sim.workspace_id}/recordings"
    pending = iter(sim.ids)
    total = 0

    async def worker() -> None:
        nonlocal total
        for recording_id in pending:
            if metadata:
                answer = await http.get(f"{base}/{recording_id}", headers=headers)
                answer.raise_for_status()
                answer.json()
            redirect = await http.get(f"{base}/{recording_id}.mp3", headers=headers)
            assert redirect.status_code == 307, redirect.status_code
            media = await http.get(redirect.headers["Location"])
            media.raise_for_status()
            body = media.content
            total += len(body)
            key = f"bare/{recording_id}.mp3"
            if same_requests:
                await asyncio.to_thread(_contract_requests, s3, bucket, key, body)
            else:
                await asyncio.to_thread(
                    s3.put_object, Bucket=bucket, Key=key, Body=body, ContentType="audio/mpeg"
                )

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await http.aclose()
    return time.perf_counter() - started, total


def _contract_requests(s3: Any, bucket: str, key: str, body: bytes) -> None:
    # What the pipeline sends for a recording of a first run (no pre-check HEAD: its ledger
    # row is new): checksummed conditional PUT, then the read-back HEAD and the sidecar PUT.
    put_media(s3, bucket, key, body)
    s3.head_object(Bucket=bucket, Key=key)
    s3.put_object(Bucket=bucket, Key=key[:-4] + ".json", Body=b"{}" * 400)


# --- media path ------------------------------------------------------------------------------


async def media_path(sim: Sim, endpoint: str, bucket: str, concurrency: int) -> tuple[float, int]:
    """Return (seconds, bytes) of :func:`archive_media` for every ID (no metadata, no SQL)."""
    _s3(endpoint, 4).create_bucket(Bucket=bucket)
    sidecar = b"{}" * 400
    with tempfile.TemporaryDirectory(prefix="bench-media-") as name:
        folder = Path(name)
        settings = _settings(sim, endpoint, bucket, folder, concurrency)
        started = time.perf_counter()
        media = build_media_store(settings)
        http = build_bird_http(settings)
        bird = build_bird_client(settings, http)
        pending = iter(sim.ids)
        total = 0

        async def worker() -> None:
            nonlocal total
            for recording_id in pending:
                result = await archive_media(
                    bird,
                    media,
                    recording_id=recording_id,
                    key=f"media/{recording_id}.mp3",
                    sidecar=sidecar,
                    temp_dir=folder,
                )
                total += result.size_bytes

        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            await http.aclose()
        return time.perf_counter() - started, total


# --- pipeline --------------------------------------------------------------------------------


def _settings(sim: Sim, endpoint: str, bucket: str, folder: Path, concurrency: int) -> Any:
    return Settings(
        bird_api_url=sim.api_url,
        bird_access_key=ACCESS_KEY,
        workspace_id=sim.workspace_id,
        database_url=f"sqlite:///{folder / 'archive.db'}",
        parquet_root=str(folder / "parquet"),
        s3_bucket=bucket,
        s3_endpoint_url=endpoint,
        concurrency=concurrency,
        requests_per_second=100_000.0,
        temp_dir=str(folder),
    )


def _id_list(ids: list[str], folder: Path) -> Any:
    return collect_ids(ids, spool_dir=str(folder))


async def pipeline_run(
    sim: Sim,
    endpoint: str,
    bucket: str,
    concurrency: int,
    ids: list[str] | None = None,
    on_start: Callable[[], object] = lambda: None,
) -> tuple[float, int, dict[str, int]]:
    """Return (seconds, bytes uploaded, counts) of one pipeline run over ``ids``.

    ``on_start`` is called when the clock starts (after the database was created).
    """
    _s3(endpoint, 4).create_bucket(Bucket=bucket)
    with tempfile.TemporaryDirectory(prefix="bench-media-") as name:
        folder = Path(name)
        settings = _settings(sim, endpoint, bucket, folder, concurrency)
        # The archive database exists before the clock starts, as it does for every run but
        # the very first: creating it (Alembic) is not media throughput.
        engine, _ = open_store(settings)
        engine.dispose()
        with _id_list(ids if ids is not None else sim.ids, folder) as id_list:
            on_start()
            started = time.perf_counter()
            report = await archive_ids(settings, id_list, ChunkOptions(), export=False)
            seconds = time.perf_counter() - started
    counts = report.counts
    return seconds, counts.bytes_uploaded, {"archived": counts.archived, "failed": counts.failed}


# --- peak RSS child --------------------------------------------------------------------------


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def rss_child(api: str, media: str, workspace: str, recording_id: str, endpoint: str) -> None:
    """Archive one recording through the pipeline; print RSS figures as JSON."""
    before = _vm("VmRSS")
    sim = Sim(api, media, workspace, [recording_id])
    seconds, uploaded, counts = asyncio.run(pipeline_run(sim, endpoint, "big", 4))
    print(
        json.dumps(
            {
                "before": before,
                "peak": _vm("VmHWM"),
                "seconds": seconds,
                "bytes": uploaded,
                **counts,
            }
        )
    )


def big_recording(big_mb: int) -> dict[str, Any]:
    with simulator(1, 1000, 2000, big=big_mb * MB) as sim, moto_server() as (endpoint, _):
        output = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.media_throughput",
                "--rss-child",
                sim.api_url,
                sim.media_url,
                sim.workspace_id,
                sim.ids[0],
                endpoint,
            ],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, **AWS_ENV},
        ).stdout
    return dict(json.loads(output.strip().splitlines()[-1]))


# --- main ------------------------------------------------------------------------------------


class CpuMeter:
    """CPU seconds used by this process, the simulator and the S3 server during a block."""

    def __init__(self, sim_pid: int, s3_pid: int) -> None:
        self.pids = {"client": os.getpid(), "simulator": sim_pid, "s3": s3_pid}

    def snapshot(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> str:
        return "  ".join(f"{name} {after[name] - before[name]:5.2f}" for name in before)


def empty_s3(endpoint: str, meter: CpuMeter) -> dict[str, float]:
    """Drop every bucket and object in moto, then return a CPU snapshot.

    Moto keeps objects in memory: without this, each round runs against a larger heap than
    the one before (its CPU per request grew by 15-35 % from round to round).
    """
    httpx.post(f"{endpoint}/moto-api/reset", timeout=30).raise_for_status()
    return meter.snapshot()


LOOPS = ("bare", "same-media", "media", "same", "pipeline")
LABELS = {
    "bare": "bare GET -> put_object",
    "same-media": "bare, media path's requests",
    "media": "media path (archive_media)",
    "same": "bare, pipeline's requests",
    "pipeline": "pipeline",
}


@dataclass
class Figures:
    """One loop's figures over the rounds."""

    rates: list[float]
    client_cpu: list[float]
    megabytes: float = 0.0


async def _run_loop(
    loop: str,
    sim: Sim,
    endpoint: str,
    bucket: str,
    concurrency: int,
    on_start: Callable[[], object],
) -> tuple[float, int]:
    """Run one loop: (seconds, bytes); ``on_start`` is called when its clock starts."""
    if loop == "pipeline":
        seconds, uploaded, counts = await pipeline_run(
            sim, endpoint, bucket, concurrency, on_start=on_start
        )
        assert counts["archived"] == len(sim.ids) and counts["failed"] == 0, counts
        return seconds, uploaded
    on_start()
    if loop == "media":
        return await media_path(sim, endpoint, bucket, concurrency)
    same = loop != "bare"
    return await bare_loop(
        sim, endpoint, bucket, concurrency, same_requests=same, metadata=loop == "same"
    )


def _mark(marks: list[dict[str, float]], meter: CpuMeter) -> None:
    marks.append(meter.snapshot())


async def throughput(
    recordings: int, size_bytes: int, concurrency: int, rounds: int, loops: list[str]
) -> None:
    low, high = int(size_bytes * 0.9), int(size_bytes * 1.1)
    with simulator(recordings, low, high) as sim, moto_server() as (endpoint, s3_pid):
        meter = CpuMeter(sim.pid, s3_pid)
        figures = {loop: Figures([], []) for loop in loops}
        for round_ in range(rounds):
            for loop in loops:
                empty_s3(endpoint, meter)
                marks: list[dict[str, float]] = []
                seconds, size = await _run_loop(
                    loop,
                    sim,
                    endpoint,
                    f"{loop}-{round_}",
                    concurrency,
                    functools.partial(_mark, marks, meter),
                )
                before, after = marks[0], meter.snapshot()
                fig = figures[loop]
                fig.megabytes = size / MB
                fig.rates.append(recordings / seconds)
                fig.client_cpu.append(after["client"] - before["client"])
                print(
                    f"round {round_ + 1}: {LABELS[loop]:<30} {seconds:6.2f} s "
                    f"{recordings / seconds:7.1f} rec/s {size / MB / seconds:7.1f} MB/s  CPU s: "
                    + meter.delta(before, after),
                    flush=True,
                )
        _summary(figures, recordings, concurrency)


def _summary(figures: dict[str, Figures], recordings: int, concurrency: int) -> None:
    megabytes = next(iter(figures.values())).megabytes
    print(f"\n{recordings} recordings, {megabytes:.1f} MB, concurrency {concurrency} (medians)")
    rate = {loop: statistics.median(fig.rates) for loop, fig in figures.items()}
    for loop, fig in figures.items():
        cpu = statistics.median(fig.client_cpu)
        spread = f"{min(fig.rates):.1f}-{max(fig.rates):.1f}"
        print(
            f"{LABELS[loop]:<30} {rate[loop]:7.1f} rec/s ({spread})  "
            f"{rate[loop] * megabytes / recordings:7.1f} MB/s  client CPU "
            f"{cpu * 1000 / recordings:6.2f} ms/rec {cpu * 1000 / megabytes:7.2f} ms/MB"
        )
    for top, bottom in (("media", "same-media"), ("pipeline", "same"), ("pipeline", "bare")):
        if top in rate and bottom in rate:
            print(f"ratio {LABELS[top]} / {LABELS[bottom]}: {rate[top] / rate[bottom]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recordings", type=int, default=200)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--size-mb", type=float, default=2.0)
    size.add_argument("--size-kb", type=float, help="recording size in kB (1,000 bytes)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--big-mb", type=int, default=500, help="0 skips the RSS measurement")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument(
        "--loops", default=",".join(LOOPS), help="comma-separated, of " + ",".join(LOOPS)
    )
    parser.add_argument("--rss-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(*args.rss_child)
        return
    os.environ.update(AWS_ENV)
    if not args.skip_throughput:
        loops = [loop for loop in args.loops.split(",") if loop]
        unknown = set(loops) - set(LOOPS)
        if unknown:
            parser.error(f"unknown loops: {', '.join(sorted(unknown))}")
        size_bytes = int(args.size_kb * 1000) if args.size_kb else int(args.size_mb * MB)
        asyncio.run(throughput(args.recordings, size_bytes, args.concurrency, args.rounds, loops))
    if args.big_mb:
        result = big_recording(args.big_mb)
        assert result["archived"] == 1, result
        print(
            f"\none recording of {args.big_mb} MB through the pipeline: "
            f"{result['seconds']:.1f} s, {args.big_mb / result['seconds']:.1f} MB/s"
        )
        print(
            f"RSS before download {result['before'] / MiB:6.1f} MiB, "
            f"peak (VmHWM) {result['peak'] / MiB:6.1f} MiB  (target <= 200 MB)"
        )


if __name__ == "__main__":
    main()
