"""recarchive against its peers, in one run on the project's simulator: metadata and media.

Run: ``.venv/bin/python -m bench.peers [--ids 20000] [--days 90] [--media 400] [--media-mb 2]
[--small 2000] [--small-kb 3] [--concurrency 16] [--rounds 1]``; a quick run:
``--ids 2000 --media 50 --small 200``. Each contender is a process of its own, timed from its
start to its exit, its CPU (user + system, children included) from ``os.wait4``; the
simulator (``recarchive simulate``, no latency, no faults) and moto's S3 server run in their
own processes too, and their CPU is shown beside. Contenders:

- metadata of the same IDs (``--ids`` created within ``--days`` days), concurrency 16:
  ``recarchive archive --skip-media`` (SQLite, and the Parquet export the run ends with, to
  a local folder: checked to hold every recording; ``RECARCHIVE_REQUESTS_PER_SECOND=100000``:
  the peers have no pacing); dlt's REST API source
  with a ``parallelized`` dependent resource to Parquet on the ``filesystem`` destination
  and dlt's plain ``@dlt.transformer(parallelized=True)`` over a ``requests`` session (both
  in :mod:`bench.peer_dlt`, in a virtual environment of its own that this bench makes once in
  ``--dlt-venv`` with ``pip install 'dlt[parquet]'``); a bare aiohttp loop and a bare httpx
  loop (default transport) (:mod:`bench.peer_loops`).
- media (``--media`` recordings of ``--media-mb`` MB, and ``--small`` of ``--small-kb`` KB):
  ``recarchive archive`` against a bare loop making the same requests (:mod:`bench.peer_loops`).

Before the timed rounds each contender runs once on a few IDs (shown as ``warm-up``: about its
process start-up cost; not in the table), so every process starts with its bytecode cached
(``PYTHONDONTWRITEBYTECODE`` is dropped for the contenders).
Prints a line per run, then a markdown table: medians over ``--rounds``, the rates of every
round, and the ratios recarchive / peer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import boto3
import httpx
import pyarrow.parquet as pq

from bench.media_throughput import AWS_ENV, MB, cpu_seconds, moto_server
from bench.peer_dlt import dlt_python, dlt_version
from bench.sim_process import SimulatorProcess, simulator_process
from recarchive.simulator.dataset import EPOCH, SPREAD_DAYS, iso
from recarchive.simulator.server import SimulatorConfig, build_dataset

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WARM_UP_IDS = 50
#: dlt contender kinds and the :mod:`bench.peer_dlt` variant each runs.
DLT_VARIANTS = {"dlt": "rest_api", "dlt-transformer": "transformer"}


@dataclass(frozen=True)
class Work:
    """One row group of the table: what every contender of it does."""

    name: str
    tag: str  # short name in the progress lines
    ids: list[str]
    unit: str  # "rec" or "MB": the unit of the rate and of the CPU figure
    media: bool
    sizes: dict[str, int] = field(default_factory=dict)  # media bytes per ID

    def units(self, ids: list[str]) -> float:
        return len(ids) if self.unit == "rec" else sum(self.sizes[i] for i in ids) / MB


@dataclass
class Run:
    """One timed run of one contender."""

    seconds: float
    cpu: float
    units: float
    servers: dict[str, float]
    api_requests: int

    @property
    def rate(self) -> float:
        return self.units / self.seconds

    @property
    def cpu_ms_per_unit(self) -> float:
        return self.cpu * 1000 / self.units


@dataclass
class Contender:
    """A contender's runs; ``label`` names it in the table."""

    label: str
    runs: list[Run] = field(default_factory=list)

    def median(self, attribute: str) -> float:
        return float(statistics.median(getattr(run, attribute) for run in self.runs))


# --- processes -------------------------------------------------------------------------------


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment of a contender: ours without RECARCHIVE_* and bytecode suppression."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("RECARCHIVE_") and name != "PYTHONDONTWRITEBYTECODE"
    }
    return {**env, **AWS_ENV, **extra}


def timed(command: Sequence[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run ``command`` to its end; return (wall seconds, CPU seconds).

    No peak RSS: Linux carries the parent's high-water mark into a child's ``ru_maxrss``
    across fork and exec, so a small contender would show the bench's own RSS.

    Raises:
        RuntimeError: It exited with a status other than 0 (the tail of its output says why).
    """
    with log.open("ab") as out:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=out)
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:  # interrupted: the contender must not outlive the bench
            process.kill()
            process.wait()
            raise
        seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(command[:3])} exited {process.returncode}:\n{tail}")
    return seconds, usage.ru_utime + usage.ru_stime


# --- the contenders ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Bench:
    """What every contender needs: the servers, the concurrency, the dlt Python."""

    sim: SimulatorProcess
    concurrency: int
    s3: tuple[str, int] | None = None  # endpoint, pid
    dlt: Path | None = None

    def server_cpu(self) -> dict[str, float]:
        pids = {"simulator": self.sim.pid, **({"s3": self.s3[1]} if self.s3 else {})}
        return {name: cpu_seconds(pid) for name, pid in pids.items()}

    def api_requests(self) -> int:
        stats = httpx.get(f"{self.sim.api_url}/_sim/stats", timeout=10).json()
        return int(stats["api"]["requests"])

    def fresh_bucket(self) -> str:
        """Empty moto (it keeps every object in memory) and make the bucket of the next run."""
        assert self.s3 is not None
        httpx.post(f"{self.s3[0]}/moto-api/reset", timeout=30).raise_for_status()
        boto3.client("s3", endpoint_url=self.s3[0]).create_bucket(Bucket="peers")
        return "peers"

    def config(self, folder: Path, ids_file: Path, variant: str = "") -> Path:
        """The JSON file the peer processes read."""
        config = {
            "variant": variant,
            "api_url": self.sim.api_url,
            "workspace_id": self.sim.workspace_id,
            "access_key": self.sim.access_key,
            "concurrency": self.concurrency,
            "ids_file": str(ids_file),
            "folder": str(folder),
            **({"s3_endpoint": self.s3[0], "bucket": "peers"} if self.s3 else {}),
        }
        path = folder / "config.json"
        path.write_text(json.dumps(config))
        return path

    def recarchive_env(self, folder: Path) -> dict[str, str]:
        return child_env(
            {
                "RECARCHIVE_BIRD_API_URL": self.sim.api_url,
                "RECARCHIVE_BIRD_ACCESS_KEY": self.sim.access_key,
                "RECARCHIVE_WORKSPACE_ID": self.sim.workspace_id,
                "RECARCHIVE_DATABASE_URL": f"sqlite:///{folder / 'archive.db'}",
                "RECARCHIVE_PARQUET_ROOT": str(folder / "parquet"),
                "RECARCHIVE_TEMP_DIR": str(folder),
                "RECARCHIVE_CONCURRENCY": str(self.concurrency),
                "RECARCHIVE_REQUESTS_PER_SECOND": "100000",
                "RECARCHIVE_PARQUET_PII": "raw",
                **(
                    {"RECARCHIVE_S3_BUCKET": "peers", "RECARCHIVE_S3_ENDPOINT_URL": self.s3[0]}
                    if self.s3
                    else {}
                ),
            }
        )

    def commands(self, kind: str, folder: Path, ids_file: Path, media: bool) -> list[list[str]]:
        """The processes of one run of contender ``kind``, in order."""
        if kind == "recarchive":
            archive = [str(BIN / "recarchive"), "archive", "--ids-file", str(ids_file)]
            # The run's own export writes the Parquet dataset: a ``recarchive export`` after
            # it finds nothing due (it cost a process start-up, ~0.6-2 s, and wrote nothing).
            return [[*archive, "--skip-media"]] if not media else [archive]
        if kind in DLT_VARIANTS:
            assert self.dlt is not None
            config = str(self.config(folder, ids_file, DLT_VARIANTS[kind]))
            return [[str(self.dlt), "-m", "bench.peer_dlt", config]]
        config = str(self.config(folder, ids_file))
        return [[sys.executable, "-m", "bench.peer_loops", kind, config]]

    def run(self, kind: str, work: Work, ids: list[str]) -> Run:
        """One run of ``kind`` over ``ids``, in a fresh folder (database, Parquet, dlt state)."""
        with tempfile.TemporaryDirectory(prefix=f"bench-peers-{kind}-") as name:
            folder = Path(name)
            ids_file = folder / "ids.txt"
            ids_file.write_text("".join(f"{recording_id}\n" for recording_id in ids))
            if work.media:
                self.fresh_bucket()
            env = self.recarchive_env(folder) if kind == "recarchive" else child_env({})
            servers, requests = self.server_cpu(), self.api_requests()
            seconds = cpu = 0.0
            for command in self.commands(kind, folder, ids_file, work.media):
                wall, used = timed(command, env, folder / "output.log")
                seconds, cpu = seconds + wall, cpu + used
            after = self.server_cpu()
            self.check(kind, folder, len(ids))
            return Run(
                seconds,
                cpu,
                work.units(ids),
                {name: after[name] - servers[name] for name in after},
                self.api_requests() - requests,  # the simulator does not count /_sim/
            )

    def check(self, kind: str, folder: Path, count: int) -> None:
        """Fail loudly when a contender did less than all of its work."""
        output = (folder / "output.log").read_text(errors="replace")
        if kind in DLT_VARIANTS:
            rows = json.loads(output.strip().splitlines()[-1])["rows"]
            if rows != count:
                raise RuntimeError(f"dlt loaded {rows} of {count} recordings")
        elif kind != "recarchive":
            done = json.loads(output.strip().splitlines()[-1])["done"]
            if done != count:
                raise RuntimeError(f"{kind} did {done} of {count} recordings")
        else:
            # Exit status 0 means every recording reached its end state; and, as for dlt,
            # every one of them is in the Parquet files.
            ids = pq.read_table(folder / "parquet" / "recordings", columns=["id"])["id"]
            found, wanted = set(ids.to_pylist()), set((folder / "ids.txt").read_text().split())
            if len(ids) != count or found != wanted:
                raise RuntimeError(
                    f"recarchive's Parquet holds {len(ids)} rows, "
                    f"{len(wanted & found)} of the {count} recordings"
                )


# --- datasets -------------------------------------------------------------------------------


def metadata_ids(count: int, days: int, seed: int) -> tuple[int, list[str]]:
    """(recordings the simulator needs, the first ``count`` IDs created within ``days``)."""
    days = min(days, SPREAD_DAYS)
    # createdAt is uniform over SPREAD_DAYS: draw enough recordings for ``count`` in ``days``.
    recordings = math.ceil(count * SPREAD_DAYS / days * 1.1) if days < SPREAD_DAYS else count
    dataset = build_dataset(SimulatorConfig(recordings=recordings, seed=seed))
    end = iso(EPOCH + timedelta(days=days))
    created = {payload["id"]: payload["createdAt"] for payload in dataset.listing()}
    ids = [recording_id for recording_id in dataset.ids if created[recording_id] < end]
    if len(ids) < count:
        raise RuntimeError(f"only {len(ids)} simulated recordings in {days} days")
    return recordings, ids[:count]


def media_ids(count: int, low: int, high: int, seed: int) -> tuple[int, list[str], dict[str, int]]:
    """(recordings, ``count`` IDs whose media is available, the media size of each)."""
    config = SimulatorConfig(recordings=1, seed=seed, media_size_range=(low, high))
    recordings = math.ceil(count / config.available_fraction * 1.2) + 10
    config = SimulatorConfig(recordings=recordings, seed=seed, media_size_range=(low, high))
    dataset = build_dataset(config)
    ids = dataset.available_ids()[:count]
    if len(ids) < count:
        raise RuntimeError(f"only {len(ids)} available recordings among {recordings}")
    return recordings, ids, {rid: dataset.media(rid).size for rid in ids}


@contextmanager
def simulator(
    recordings: int, seed: int, low: int = 4000, high: int = 400_000
) -> Iterator[SimulatorProcess]:
    sizes = ["--media-size-min", str(low), "--media-size-max", str(high)]
    with simulator_process(
        recordings=recordings, seed=seed, extra_args=sizes, start_seconds=30 + recordings / 500
    ) as sim:
        yield sim


# --- rounds and the table -------------------------------------------------------------------


def measure(bench: Bench, work: Work, kinds: dict[str, str], rounds: int) -> list[Contender]:
    """Each contender once on a few IDs (a warm-up, not in the table), then ``rounds`` rounds."""
    print(f"{work.name}:", flush=True)
    # The warm-up's figures are shown: on a few IDs they are about a process's start-up cost.
    for kind in kinds:
        show(work, kind, "warm-up", bench.run(kind, work, work.ids[:WARM_UP_IDS]))
    contenders = {kind: Contender(label) for kind, label in kinds.items()}
    for round_ in range(rounds):
        for kind, contender in contenders.items():
            run = bench.run(kind, work, work.ids)
            contender.runs.append(run)
            show(work, kind, f"round {round_ + 1}", run)
    return list(contenders.values())


def show(work: Work, kind: str, which: str, run: Run) -> None:
    """Print the figures of one run."""
    servers = "  ".join(f"{name} CPU {used:5.1f} s" for name, used in run.servers.items())
    print(
        f"{which:<8} {work.tag:<9} {kind:<10} {run.units:8.1f} {work.unit} {run.seconds:6.1f} s"
        f"  {run.rate:7.1f} {work.unit}/s  CPU {run.cpu:5.1f} s = "
        f"{run.cpu_ms_per_unit:6.2f} ms/{work.unit}  "
        f"{servers}  API requests {run.api_requests}",
        flush=True,
    )


def table(results: list[tuple[Work, list[Contender]]]) -> str:
    """The markdown table: medians, the rate of every round, recarchive / each peer.

    Two ratios: of the rates (above 1: recarchive is faster) and of the CPU per unit (below 1:
    recarchive needs less); the second is the steadier one on a busy machine.
    """
    lines = [
        "| work | contender | rate | client CPU | rates of the rounds | recarchive / it: rate "
        "| CPU |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for work, contenders in results:
        rate, cpu = contenders[0].median("rate"), contenders[0].median("cpu_ms_per_unit")
        for index, contender in enumerate(contenders):
            unit = work.unit
            rounds = ", ".join(f"{run.rate:,.1f}" for run in contender.runs)
            theirs_rate, theirs_cpu = contender.median("rate"), contender.median("cpu_ms_per_unit")
            ratios = " | " if index == 0 else f"{rate / theirs_rate:.2f} | {cpu / theirs_cpu:.2f}"
            lines.append(
                f"| {work.name if index == 0 else 'same'} | {contender.label} | "
                f"{theirs_rate:,.1f} {unit}/s | {theirs_cpu:.2f} ms/{unit} | {rounds} | {ratios} |"
            )
    return "\n".join(lines)


def metadata_work(args: argparse.Namespace, dlt: Path | None) -> tuple[Work, list[Contender]]:
    recordings, ids = metadata_ids(args.ids, args.days, args.seed)
    kinds = {
        "recarchive": "`recarchive archive --skip-media` (its Parquet export included)",
        **(
            {
                "dlt": f"dlt {dlt_version(dlt)} REST API source, parallelized → Parquet",
                "dlt-transformer": f"dlt {dlt_version(dlt)} parallelized transformer → Parquet",
            }
            if dlt
            else {}
        ),
        "aiohttp": "bare aiohttp loop",
        "httpx": "bare httpx loop (default transport)",
    }
    name = f"{args.ids:,} metadata GETs over {args.days} days, whole process"
    work = Work(name, "metadata", ids, "rec", False)
    with simulator(recordings, args.seed) as sim:
        return work, measure(Bench(sim, args.concurrency, dlt=dlt), work, kinds, args.rounds)


def media_work(
    args: argparse.Namespace, s3: tuple[str, int], count: int, size: int, unit: str
) -> tuple[Work, list[Contender]]:
    low, high = int(size * 0.95), int(size * 1.05)
    recordings, ids, sizes = media_ids(count, low, high, args.seed)
    shown = f"{size / MB:g} MB" if size >= MB else f"{size / 1000:g} KB"
    name = f"{count:,} x {shown} media, whole process"
    work = Work(name, f"x {shown}", ids, unit, True, sizes)
    kinds = {
        "recarchive": "`recarchive archive`",
        "media": "bare loop, same requests (aiohttp, boto3)",
    }
    with simulator(recordings, args.seed, low, high) as sim:
        return work, measure(Bench(sim, args.concurrency, s3=s3), work, kinds, args.rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", type=int, default=20_000, help="metadata IDs")
    parser.add_argument("--days", type=int, default=90, help="their createdAt spread")
    parser.add_argument("--media", type=int, default=400, help="recordings of --media-mb")
    parser.add_argument("--media-mb", type=float, default=2.0)
    parser.add_argument("--small", type=int, default=2000, help="recordings of --small-kb")
    parser.add_argument("--small-kb", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--dlt-venv", type=Path, default=Path.home() / ".cache/recarchive-bench/dlt-venv"
    )
    parser.add_argument("--skip-dlt", action="store_true")
    args = parser.parse_args()
    # A SIGTERM unwinds like Ctrl-C, so the simulator and moto are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.update(AWS_ENV)
    dlt = None if args.skip_dlt or not args.ids else dlt_python(args.dlt_venv)
    results = []
    if args.ids:
        results.append(metadata_work(args, dlt))
    if args.media or args.small:
        with moto_server() as s3:
            if args.media:
                results.append(media_work(args, s3, args.media, int(args.media_mb * MB), "MB"))
            if args.small:
                results.append(media_work(args, s3, args.small, int(args.small_kb * 1000), "rec"))
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(
        f"\n`.venv/bin/python -m bench.peers {' '.join(sys.argv[1:])}`: {os.cpu_count()} cores, "
        f"load average at the end {load}, concurrency {args.concurrency}, "
        f"{args.rounds} round(s), medians\n"
    )
    print(table(results))


if __name__ == "__main__":
    main()
