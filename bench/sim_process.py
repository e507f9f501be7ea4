"""Run the Bird simulator in its own process, so it does not share the GIL with the client."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from recarchive.simulator.server import DEFAULT_WORKSPACE, SimulatorConfig


@dataclass(frozen=True)
class SimulatorProcess:
    """Where a simulator subprocess listens."""

    api_url: str
    media_url: str
    workspace_id: str
    access_key: str
    pid: int = 0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers that need it on the command line)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def simulator_process(
    *,
    recordings: int,
    seed: int = 1,
    faults: str = "none",
    rate_limit: float | None = None,
    extra_args: Sequence[str] = (),
    start_seconds: float = 20,
) -> Iterator[SimulatorProcess]:
    """Start ``recarchive simulate`` (with ``extra_args``) and stop it afterwards."""
    port, media_port = free_port(), free_port()
    access_key = SimulatorConfig().access_key
    command = [
        str(Path(sys.executable).parent / "recarchive"),
        "simulate",
        "--port",
        str(port),
        "--media-port",
        str(media_port),
        "--recordings",
        str(recordings),
        "--seed",
        str(seed),
        "--faults",
        faults,
        "--access-key",
        access_key,
    ]
    if rate_limit is not None:
        command += ["--rate-limit", str(rate_limit)]
    command += extra_args
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api_url = f"http://127.0.0.1:{port}"
    try:
        # A big dataset takes a while to build (about 0.5 ms per recording on a busy machine).
        deadline = time.monotonic() + start_seconds
        while True:
            try:
                httpx.get(api_url, timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("simulator did not start") from None
                time.sleep(0.1)
        yield SimulatorProcess(
            api_url, f"http://127.0.0.1:{media_port}", DEFAULT_WORKSPACE, access_key, process.pid
        )
    finally:
        process.terminate()
        process.wait(timeout=10)
