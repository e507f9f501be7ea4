"""The simulator's HTTP servers: the API host and the separate media host, and their log.

Both are aiohttp applications on 127.0.0.1 (their routes in :mod:`.api_host` and
:mod:`.media_host`), run by :class:`SimulatorServer` on an event loop in a background thread,
so a test (or the demo) can start one in-process and talk to it over real sockets; the server
logs every request either host receives (unless told not to: ``keep_requests``) and counts
them (``GET /_sim/stats`` on the API host; the dataset's IDs at ``GET /_sim/ids``). :func:`serve`
runs one in the foreground for ``recarchive simulate``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from recarchive.simulator.api_host import ApiHost
from recarchive.simulator.dataset import Dataset, RecordingSet
from recarchive.simulator.faults import FaultProfile
from recarchive.simulator.host import (
    DroppedConnection,
    HideDroppedConnections,
    HostState,
    RequestStats,
)
from recarchive.simulator.lazy import MAX_RECORDINGS, LazyDataset
from recarchive.simulator.media_host import LOGGED, MediaHost
from recarchive.simulator.transcripts import TranscriptionHost, TranscriptionStore

logger = logging.getLogger(__name__)

DEFAULT_WORKSPACE = "6f1c2a34-8d0e-4b7a-9c11-2f5e8d3b7a10"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: The simulator's own endpoints on the API host: no key, no latency, never logged or counted.
SIM_PREFIX = "/_sim/"
#: When a request arrived (``time.monotonic()``), set by the middlewares.
ARRIVED = web.RequestKey("arrived", float)


@dataclass(frozen=True)
class SimulatorConfig:
    """How the simulator behaves.

    Attributes:
        recordings: Recordings in the dataset.
        seed: Seed of the dataset and of every fault decision.
        faults: Fault profile: a profile name or a comma list (see :mod:`.faults`).
        rate_limit: API requests per second before answering 429 (``None``: unlimited).
        access_key: The only key the API accepts (``AccessKey`` or ``Bearer`` scheme).
        workspace_id: The workspace served.
        port: API port (0 picks a free one).
        media_port: Media host port (0 picks a free one).
        host: Interface to listen on; loopback only.
        media_size_range: Smallest and largest media size in bytes.
        available_fraction: Share of recordings whose media is available.
        url_ttl_seconds: Lifetime of a signed media URL.
        missing_fraction: Share of the ``recordings`` IDs the API answers 404 for (seeded).
        latency_seconds: Every API request waits this long before it is answered (media
            requests do not: their time is the transfer's).
        transcriptions: Recordings whose payload says ``transcription: true`` (about 30 %)
            have transcriptions (:mod:`.transcripts`); off (the default, so the recordings'
            request counts stay as they were): every payload says ``false``.
        transcription_ready_seconds: ``accepted`` transcriptions turn ``available`` this long
            after the start (``None``: only ``transcriptions.make_ready()`` turns them).
        lazy: Draw each recording when asked (:class:`~recarchive.simulator.lazy.LazyDataset`):
            millions start in seconds and stay small, but the IDs differ from the default's.
        keep_requests: Keep every request in :attr:`SimulatorServer.requests` (tests read it);
            off (``recarchive simulate``): only the counts, flat over millions of requests.
    """

    recordings: int = 300
    seed: int = 1
    faults: str = "none"
    rate_limit: float | None = None
    access_key: str = "sim-access-key"
    workspace_id: str = DEFAULT_WORKSPACE
    port: int = 0
    media_port: int = 0
    host: str = "127.0.0.1"
    media_size_range: tuple[int, int] = (4_000, 400_000)
    available_fraction: float = 0.8
    url_ttl_seconds: float = 60.0
    missing_fraction: float = 0.0
    latency_seconds: float = 0.0
    transcriptions: bool = False
    transcription_ready_seconds: float | None = None
    lazy: bool = False
    keep_requests: bool = True

    def __post_init__(self) -> None:
        """Refuse settings the simulator cannot serve.

        Raises:
            ValueError: A setting is out of range, or the fault profile names an unknown fault.
        """
        low, high = self.media_size_range
        rate = self.rate_limit
        wrong = {
            f"recordings must not be negative: {self.recordings}": self.recordings < 0,
            f"media sizes must be positive, the smallest not above the largest: {low}-{high}": (
                not 0 < low <= high
            ),
            f"the rate limit must be positive: {rate}": rate is not None and rate <= 0,
            f"latency must not be negative: {self.latency_seconds}": self.latency_seconds < 0,
            f"the available fraction must be between 0 and 1: {self.available_fraction}": (
                not 0 <= self.available_fraction <= 1
            ),
            f"the missing fraction must be between 0 and 1: {self.missing_fraction}": (
                not 0 <= self.missing_fraction <= 1
            ),
            f"a lazy dataset holds fewer than 2**32 recordings: {self.recordings}": (
                self.lazy and self.recordings >= MAX_RECORDINGS
            ),
        }
        problems = [message for message, is_wrong in wrong.items() if is_wrong]
        if problems:
            raise ValueError("; ".join(problems))
        FaultProfile.parse(self.faults, self.seed)  # raises UnknownFaultError, a ValueError


def build_dataset(
    config: SimulatorConfig, *, held_back: Callable[[str], bool] | None = None
) -> RecordingSet:
    """The dataset ``config`` describes: eager, or lazy with ``config.lazy``.

    Args:
        config: The simulator's settings.
        held_back: Which ``available`` recordings the ``notready`` fault holds back (they
            say ``completed``); ``None``: none.
    """
    common: dict[str, Any] = {
        "workspace_id": config.workspace_id,
        "media_size_range": config.media_size_range,
        "available_fraction": config.available_fraction,
        "missing_fraction": config.missing_fraction,
        "transcriptions": config.transcriptions,
    }
    if config.lazy:  # holds them back as it draws them: no scan at start
        return LazyDataset(config.recordings, config.seed, held_back=held_back, **common)
    dataset = Dataset(config.recordings, config.seed, **common)
    if held_back is not None:
        for recording_id in dataset.available_ids():
            if held_back(recording_id):
                dataset.set_status(recording_id, "completed")
    return dataset


@dataclass(frozen=True)
class RequestRecord:
    """One request the simulator received.

    Attributes:
        server: ``api`` or ``media``.
        method: HTTP method.
        path: URL path.
        query: Query parameters.
        status: Status answered (0 when the connection was dropped on purpose).
        auth_scheme: Scheme of the ``Authorization`` header, if any (never the key).
        at: ``time.monotonic()`` when the request arrived.
    """

    server: str
    method: str
    path: str
    query: dict[str, str]
    status: int
    auth_scheme: str | None
    at: float

    @property
    def has_authorization(self) -> bool:
        """True when the request carried an ``Authorization`` header."""
        return self.auth_scheme is not None


_http_logger = logging.getLogger("recarchive.simulator.http")
_http_logger.addFilter(HideDroppedConnections())


class SimulatorServer:
    """The Bird API simulator: API host and media host on loopback, in a background thread.

    Args:
        config: Dataset, faults and ports.

    Attributes:
        dataset: The recordings served; tests may change it while the server runs.
        transcriptions: The recordings' transcriptions (tests may change them too).
        requests: Every request received, in the order they were answered (none kept when
            ``config.keep_requests`` is off).
        stats: The counts served at ``GET /_sim/stats``.
    """

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config or SimulatorConfig()
        self.faults = FaultProfile.parse(self.config.faults, self.config.seed)
        held_back = None
        if self.faults.active("notready"):
            held_back = functools.partial(self.faults.hits_recording, "notready")
        self.dataset = build_dataset(self.config, held_back=held_back)
        self.requests: list[RequestRecord] = []
        # Only keys some fault may hit are counted (see _attempt): bounded by the hits.
        self._attempts: dict[str, int] = {}
        self.stats = RequestStats()
        state = HostState(self.config, self.dataset, self.faults, self._attempt, self.stats)
        media_log = functools.partial(self._log, "media")
        self._media = MediaHost(state, media_log, lambda: self.media_url)
        self._api = ApiHost(state, self._media)
        self.transcriptions = TranscriptionStore(
            self.dataset, self.config.seed, self.config.transcription_ready_seconds
        )
        self._transcripts = TranscriptionHost(
            self.config.workspace_id,
            self.transcriptions,
            self._api.request_faults,
            lambda rid: self.dataset.payload(rid) is not None,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runners: list[web.AppRunner] = []
        self.port = self.config.port
        self.media_port = self.config.media_port

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        """Base URL of the API host (what ``RECARCHIVE_BIRD_API_URL`` points at)."""
        return f"http://{self.config.host}:{self.port}"

    @property
    def media_url(self) -> str:
        """Base URL of the media host."""
        return f"http://{self.config.host}:{self.media_port}"

    def start(self) -> SimulatorServer:
        """Start both servers; returns once they accept connections."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._start_sites())
            except BaseException as exc:  # reported to the starting thread below
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._stop_sites())
            loop.close()

        self._thread = threading.Thread(target=run, name="bird-simulator", daemon=True)
        self._thread.start()
        ready.wait(timeout=30)
        if errors:
            raise RuntimeError(f"simulator did not start: {errors[0]}") from errors[0]
        return self

    def stop(self) -> None:
        """Stop both servers and their thread."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        self._loop = None
        self._thread = None

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def _start_sites(self) -> None:
        api = web.Application(middlewares=[self._api_middleware])
        self._api.add_routes(api.router)
        self._transcripts.add_routes(api.router)
        media = web.Application(middlewares=[self._media_middleware])
        self._media.add_routes(media.router)
        for app, attr in ((api, "port"), (media, "media_port")):
            runner = web.AppRunner(app, access_log=None, handle_signals=False, logger=_http_logger)
            await runner.setup()
            site = web.TCPSite(runner, self.config.host, getattr(self, attr), backlog=1024)
            await site.start()
            self._runners.append(runner)
            server = site._server
            assert server is not None
            sockets = getattr(server, "sockets", None) or []
            setattr(self, attr, sockets[0].getsockname()[1])

    async def _stop_sites(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()

    # --- request log ---------------------------------------------------------------------

    def _kept(self) -> list[RequestRecord]:
        if not self.config.keep_requests:
            # An empty answer would pass a "no leaks" check without looking: refuse instead.
            raise RuntimeError("this simulator keeps no request log (keep_requests=False)")
        return self.requests

    @property
    def leaks(self) -> list[RequestRecord]:
        """Requests to the media host that carried an ``Authorization`` header.

        Raises:
            RuntimeError: The server keeps no request log (``keep_requests`` off); so do
                :meth:`api_requests` and :meth:`media_requests`.
        """
        return [r for r in self._kept() if r.server == "media" and r.has_authorization]

    def api_requests(self, path_suffix: str | None = None) -> list[RequestRecord]:
        """API requests, optionally only those whose path ends with ``path_suffix``."""
        return [
            r
            for r in self._kept()
            if r.server == "api" and (path_suffix is None or r.path.endswith(path_suffix))
        ]

    def media_requests(self) -> list[RequestRecord]:
        """Requests to the media host."""
        return [r for r in self._kept() if r.server == "media"]

    def clear_requests(self) -> None:
        """Forget the request log and the counts (tests that count a second run's requests)."""
        self.requests = []
        self.stats.reset()

    def _log(self, server: str, request: web.Request, status: int) -> None:
        self.stats.answered(server, status)
        if not self.config.keep_requests:
            return
        header = request.headers.get("Authorization")
        scheme = header.split(" ", 1)[0] if header else None
        self.requests.append(
            RequestRecord(
                server,
                request.method,
                request.path,
                dict(request.query),
                status,
                scheme,
                request.get(ARRIVED, time.monotonic()),
            )
        )

    def _attempt(self, key: str) -> int:
        # The attempt number only matters to a fault that hits the key's first attempt (see
        # FaultProfile.hits): any other key answers 0 and costs no entry, so the counter grows
        # with the faults' hits, not with every recording (none at all without faults).
        if not self.faults.may_hit(key):
            return 0
        attempt = self._attempts.get(key, 0)
        self._attempts[key] = attempt + 1
        return attempt

    # --- middlewares -----------------------------------------------------------------------

    @web.middleware
    async def _api_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(SIM_PREFIX):
            return await handler(request)
        request[ARRIVED] = arrived = time.monotonic()
        self.stats.api_arrived(arrived)
        if self.config.latency_seconds:
            # Awaited on the event loop: the other requests are served meanwhile.
            await asyncio.sleep(self.config.latency_seconds)
        try:
            response = await self._api.checks(request) or await handler(request)
        except DroppedConnection:
            self._log("api", request, 0)
            raise
        except web.HTTPException as exc:
            self._log("api", request, exc.status)
            raise
        self._log("api", request, response.status)
        return response

    @web.middleware
    async def _media_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        request[ARRIVED] = time.monotonic()
        try:
            response = await handler(request)
        except DroppedConnection:
            if not request.get(LOGGED):
                self._log("media", request, 0)
            raise
        except web.HTTPException as exc:
            self._log("media", request, exc.status)
            raise
        if not request.get(LOGGED):
            self._log("media", request, response.status)
        return response


def serve(config: SimulatorConfig, *, stats_file: Path | None = None) -> None:
    """Run the simulator in the foreground until interrupted (``recarchive simulate``).

    Args:
        config: The simulator's settings.
        stats_file: Where to write the ``GET /_sim/stats`` document when the simulator stops
            (Ctrl-C or SIGTERM); ``None``: nowhere.
    """
    server = SimulatorServer(config)
    server.start()
    missing = len(server.dataset.missing_ids)
    print(f"Bird API simulator: {server.api_url}  (media host {server.media_url})", flush=True)
    print(
        f"  workspace {config.workspace_id}, {len(server.dataset.ids)} recordings"
        f"{f' (+{missing} missing IDs)' if missing else ''}, "
        f"seed {config.seed}, faults {config.faults!r}, rate limit {config.rate_limit}",
        flush=True,
    )
    print(
        f"  e.g. RECARCHIVE_BIRD_API_URL={server.api_url} "
        f"RECARCHIVE_WORKSPACE_ID={config.workspace_id} "
        f"RECARCHIVE_BIRD_ACCESS_KEY=<the --access-key>",
        flush=True,
    )
    if stats_file is not None:
        # SIGTERM (what a benchmark or a supervisor sends) must reach the finally below too.
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        threading.Event().wait()  # until Ctrl-C or a signal ends the process
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        if stats_file is not None:
            stats_file.write_text(json.dumps(server.stats.snapshot(), indent=2) + "\n")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
