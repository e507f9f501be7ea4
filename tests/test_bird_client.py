"""The Bird API client against the simulator over real HTTP: statuses, faults, the redirect."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from pydantic import SecretStr

from recarchive.bird.client import BirdClient
from recarchive.bird.http import build_http_client
from recarchive.bird.ratelimit import RequestPacer
from recarchive.bird.retry import RetryPolicy, parse_retry_after
from recarchive.errors import (
    AuthError,
    ClientRequestError,
    InvalidRedirectError,
    MediaIntegrityError,
    NotFoundError,
    PayloadError,
    RetryableError,
    ServerError,
    TransportError,
)
from recarchive.simulator.server import SimulatorServer
from tests.fixtures.simulator import BirdClientFactory, SimulatorFactory


async def download(client: BirdClient, recording_id: str, attempts: int = 4) -> bytes:
    """Download media, retrying a broken stream the way the media layer does."""
    for attempt in range(attempts):
        try:
            async with client.open_media(recording_id) as media:
                return b"".join([chunk async for chunk in media.iter_bytes(64 * 1024)])
        except (TransportError, MediaIntegrityError):
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


async def test_get_recording_returns_the_payload(
    simulator: SimulatorServer, bird_client_factory: BirdClientFactory
) -> None:
    client = bird_client_factory(simulator)
    recording_id = simulator.dataset.ids[0]
    assert await client.get_recording(recording_id) == simulator.dataset.payload(recording_id)
    request = simulator.api_requests()[-1]
    assert request.path.endswith(recording_id) and request.auth_scheme == "AccessKey"


@pytest.mark.parametrize("scheme", ["AccessKey", "Bearer"])
async def test_both_auth_schemes_are_accepted(
    simulator: SimulatorServer, bird_client_factory: BirdClientFactory, scheme: str
) -> None:
    client = bird_client_factory(simulator, auth_scheme=scheme)
    await client.get_recording(simulator.dataset.ids[1])
    assert simulator.api_requests()[-1].auth_scheme == scheme


async def test_wrong_key_stops_with_auth_error_and_no_secret(
    simulator: SimulatorServer,
    bird_client_factory: BirdClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "wrong-key-4f9a8b"
    client = bird_client_factory(simulator, access_key=secret)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(AuthError) as info:
        await client.get_recording(simulator.dataset.ids[0])
    assert len(simulator.api_requests()) == 1  # 401 is never retried
    rendered = f"{info.value} {info.value!r} {client!r} {caplog.text}"
    assert secret not in rendered and simulator.config.access_key not in rendered
    assert "RECARCHIVE_BIRD_ACCESS_KEY" in str(info.value)


@pytest.mark.parametrize(
    ("recording_id", "error", "status"),
    [
        ("00000000-0000-4000-8000-000000000000", NotFoundError, 404),
        ("not-a-uuid-at-all-but-36-chars-long!", ClientRequestError, 422),
    ],
    ids=["unknown-404", "invalid-422"],
)
async def test_terminal_statuses_are_not_retried(
    simulator: SimulatorServer,
    bird_client_factory: BirdClientFactory,
    recording_id: str,
    error: type[Exception],
    status: int,
) -> None:
    client = bird_client_factory(simulator)
    with pytest.raises(error):
        await client.get_recording(recording_id)
    assert [r.status for r in simulator.api_requests()] == [status]


# Each fault profile, and what every recording must end as through the client.
FAULT_CASES = [
    pytest.param("500", id="5xx"),
    pytest.param("reset", id="connection-reset"),
    pytest.param("slow", id="slow"),
    pytest.param("429", id="random-429"),
    pytest.param("truncate", id="truncated-media"),
    pytest.param("expired", id="expired-url"),
    pytest.param("chaos", id="chaos"),
]


@pytest.mark.parametrize("faults", FAULT_CASES)
async def test_client_comes_through_each_fault_profile(
    simulator_factory: SimulatorFactory, bird_client_factory: BirdClientFactory, faults: str
) -> None:
    sim = simulator_factory(recordings=30, seed=11, faults=faults, available_fraction=1.0)
    client = bird_client_factory(sim)
    missing = {rid for rid in sim.dataset.ids if sim.faults.hits_recording("404", rid)}

    async def fetch(recording_id: str) -> str:
        try:
            payload = await client.get_recording(recording_id)
        except NotFoundError:
            return "missing"
        assert payload == sim.dataset.payload(recording_id)
        if payload["status"] != "available":
            return "pending"
        body = await download(client, recording_id)
        assert hashlib.sha256(body).hexdigest() == sim.dataset.media(recording_id).sha256()
        return "archived"

    outcomes = dict(
        zip(
            sim.dataset.ids,
            await asyncio.gather(*(fetch(rid) for rid in sim.dataset.ids)),
            strict=True,
        )
    )
    expected = {
        rid: "missing"
        if rid in missing
        else "archived"
        if sim.dataset.has_media(rid)
        else "pending"
        for rid in sim.dataset.ids
    }
    assert outcomes == expected
    assert sim.leaks == []
    hit = [r for r in sim.requests if r.status in (0, 429, 500, 502, 503, 403)]
    if faults not in ("slow",):
        assert hit, f"profile {faults} injected no fault: the test would prove nothing"


async def test_retries_are_capped(
    simulator_factory: SimulatorFactory, bird_client_factory: BirdClientFactory
) -> None:
    sim = simulator_factory(recordings=40, seed=3, faults="500")
    client = bird_client_factory(sim, max_attempts=1)
    results = await asyncio.gather(
        *(client.get_recording(rid) for rid in sim.dataset.ids), return_exceptions=True
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures and all(isinstance(f, ServerError) for f in failures)
    assert all("gave up after 1 attempts" in str(f) for f in failures)
    assert len(sim.api_requests()) == len(sim.dataset.ids)


async def test_expired_url_gets_a_fresh_redirect(
    simulator_factory: SimulatorFactory, bird_client_factory: BirdClientFactory
) -> None:
    sim = simulator_factory(recordings=60, seed=5, faults="expired", available_fraction=1.0)
    client = bird_client_factory(sim)
    expired = [rid for rid in sim.dataset.ids if sim.faults.hits("expired", f"expired:{rid}", 0)]
    assert expired, "seed hits no recording"
    recording_id = expired[0]
    body = await download(client, recording_id)
    assert body == sim.dataset.media_bytes(recording_id)
    links = sim.api_requests(f"{recording_id}.mp3")
    media = [r for r in sim.media_requests() if recording_id in r.path]
    assert len(links) >= 2 and media[0].status == 403 and media[-1].status == 200


async def test_media_host_never_sees_authorization(
    simulator: SimulatorServer, bird_client_factory: BirdClientFactory
) -> None:
    # Even a client whose defaults carry credentials must not send them to the media host.
    key = simulator.config.access_key
    http = httpx.AsyncClient(headers={"Authorization": f"AccessKey {key}"})
    client = bird_client_factory(simulator, http=http)
    ids = simulator.dataset.available_ids()[:5]
    for recording_id in ids:
        assert await download(client, recording_id) == simulator.dataset.media_bytes(recording_id)
    assert len(simulator.media_requests()) == len(ids)
    assert simulator.leaks == []


async def test_truncated_body_is_an_integrity_error(
    simulator_factory: SimulatorFactory, bird_client_factory: BirdClientFactory
) -> None:
    sim = simulator_factory(recordings=30, seed=9, faults="truncate", available_fraction=1.0)
    client = bird_client_factory(sim)
    hit = next(rid for rid in sim.dataset.ids if sim.faults.hits("truncate", f"media:{rid}", 0))
    with pytest.raises((MediaIntegrityError, TransportError)) as info:
        async with client.open_media(hit) as media:
            async for _chunk in media.iter_bytes():
                pass
    assert isinstance(info.value, RetryableError)
    assert "X-Amz-Signature" not in str(info.value)


def redirect_transport(location: str | None, status: int = 307) -> httpx.MockTransport:
    """An API that answers the .mp3 request with ``status`` and ``location``."""

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(".mp3"):
            headers = {"Location": location} if location else {}
            return httpx.Response(status, headers=headers)
        return httpx.Response(200, content=b"\xff\xfb\x90\x44" + b"\0" * 100)

    return httpx.MockTransport(handle)


@pytest.mark.parametrize(
    ("api_url", "location", "status", "message"),
    [
        ("https://api.bird.test", "http://media.test/x.mp3?sig=s3cr3t", 307, "downgrades"),
        ("https://api.bird.test", "/relative/x.mp3?sig=s3cr3t", 307, "non-absolute"),
        ("https://api.bird.test", "ftp://media.test/x.mp3?sig=s3cr3t", 307, "non-absolute"),
        ("https://api.bird.test", None, 200, "expected a redirect"),
    ],
    ids=["https-to-http", "relative", "ftp", "no-redirect"],
)
async def test_unsafe_redirects_are_refused(
    api_url: str, location: str | None, status: int, message: str
) -> None:
    # A misbehaving API cannot be made from the simulator, so this one is a mock transport.
    async with httpx.AsyncClient(transport=redirect_transport(location, status)) as http:
        client = BirdClient(
            http,
            api_url=api_url,
            workspace_id="ws",
            access_key=SecretStr("k"),
            pacer=RequestPacer(1000),
        )
        with pytest.raises(InvalidRedirectError, match=message) as info:
            async with client.open_media("00000000-0000-4000-8000-000000000001"):
                pass
    assert "s3cr3t" not in str(info.value)


async def test_list_pages_through_the_window(
    simulator_factory: SimulatorFactory, bird_client_factory: BirdClientFactory
) -> None:
    sim = simulator_factory(recordings=120, seed=4)
    client = bird_client_factory(sim)
    since = datetime(2025, 4, 1, tzinfo=UTC)
    until = datetime(2025, 6, 1, tzinfo=UTC)
    listed = [p["id"] async for p in client.list_recordings(since=since, until=until, page_size=7)]
    expected = sim.dataset.ids_created_between(since, until)
    assert sorted(listed) == sorted(expected) and len(listed) == len(set(listed))
    assert 0 < len(expected) < 120
    pages = sim.api_requests("/recordings")
    assert len(pages) == -(-len(expected) // 7)
    assert all(r.query["limit"] == "7" for r in pages)
    assert "pageToken" not in pages[0].query and "pageToken" in pages[-1].query


async def test_list_filters_by_status(
    simulator: SimulatorServer, bird_client_factory: BirdClientFactory
) -> None:
    client = bird_client_factory(simulator)
    listed = [p async for p in client.list_recordings(status="available")]
    assert {p["status"] for p in listed} == {"available"}
    assert len(listed) == len(simulator.dataset.available_ids())


async def test_delete_removes_media(
    simulator: SimulatorServer, bird_client_factory: BirdClientFactory
) -> None:
    client = bird_client_factory(simulator)
    recording_id = simulator.dataset.available_ids()[0]
    await client.delete_recording(recording_id)
    assert simulator.dataset.is_deleted(recording_id)
    with pytest.raises(NotFoundError):
        async with client.open_media(recording_id):
            pass


async def test_pacing_holds_the_configured_rate(
    simulator_factory: SimulatorFactory, bird_client_factory: BirdClientFactory
) -> None:
    sim = simulator_factory(recordings=40, seed=2, rate_limit=20)
    client = bird_client_factory(sim, rate=20)
    started = time.monotonic()
    await asyncio.gather(*(client.get_recording(rid) for rid in sim.dataset.ids))
    elapsed = time.monotonic() - started
    assert elapsed >= (40 - 1) / 20 * 0.9  # never faster than the rate
    assert client.stats["rate_limited"] <= 1


async def test_retry_after_pauses_every_sender(
    simulator_factory: SimulatorFactory, bird_client_factory: BirdClientFactory
) -> None:
    sim = simulator_factory(recordings=30, seed=2, rate_limit=10)
    client = bird_client_factory(sim, rate=200)  # too fast on purpose
    await asyncio.gather(*(client.get_recording(rid) for rid in sim.dataset.ids))
    assert client.pacer.pauses >= 1
    limited = [r for r in sim.api_requests() if r.status == 429]
    # After a pause every sender waits, so 429s stay a fraction of what 200/s would cause.
    assert 0 < len(limited) < len(sim.dataset.ids)
    assert len([r for r in sim.api_requests() if r.status == 200]) == 30


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("0", None),
        ("3", 3.0),
        ("1.5", 1.5),
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),  # in the past
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header) == expected


def test_parse_retry_after_http_date_in_the_future() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    header = (now + timedelta(seconds=30)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert parse_retry_after(header, now=now) == pytest.approx(30.0)


def test_retry_policy_prefers_retry_after_and_caps_it() -> None:
    policy = RetryPolicy(base_delay=1, max_delay=8, max_retry_after=60)
    assert policy.delay(1, 5.0) == 5.0
    assert policy.delay(1, 600.0) == 60.0
    assert all(0 <= policy.delay(4, None) <= 8 for _ in range(100))
    assert policy.may_retry(1, 0, 1) and not policy.may_retry(6, 0, 1)
    assert not policy.may_retry(1, 299.5, 1)


def test_pacer_spaces_slots_and_pauses() -> None:
    now = [100.0]
    pacer = RequestPacer(10, clock=lambda: now[0])
    assert [round(pacer.reserve(), 3) for _ in range(3)] == [0.0, 0.1, 0.2]
    pacer.pause(2.0)
    assert pacer.reserve() == pytest.approx(2.0)
    now[0] += 10
    assert pacer.reserve() == 0.0


async def test_no_log_line_carries_a_presigned_signature(
    simulator: SimulatorServer,
    bird_client_factory: BirdClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The pipeline's transport (aiohttp). httpx's own transport (httpcore) traces every
    # answer's headers at DEBUG, the 307's Location included; the pipeline never uses it.
    client = bird_client_factory(simulator)
    caplog.set_level(logging.DEBUG)  # every logger
    recording_id = simulator.dataset.available_ids()[0]
    # Control: the link the API answers with does carry a signature that could leak.
    location = await client._media_location(recording_id)
    assert "X-Amz-Signature" in location
    assert await download(client, recording_id)
    lines = [f"{r.name}: {r.getMessage()}" for r in caplog.records]
    assert not any("X-Amz-Signature" in line for line in lines), lines


def test_httpx_request_log_lines_lose_their_query_string() -> None:
    # The BirdClient sends through the transport (no httpx request lines); a caller sending
    # through the client itself still gets its URLs logged without the query.
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    build_http_client(aiohttp=False)  # installs the filter on the "httpx" logger
    httpx_logger = logging.getLogger("httpx")
    httpx_logger.addHandler(handler)
    try:
        url = httpx.URL("https://media.example/r.mp3?X-Amz-Signature=secret")
        httpx_logger.warning('HTTP Request: %s %s "%s"', "GET", url, "HTTP/1.1 200 OK")
    finally:
        httpx_logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        'HTTP Request: GET https://media.example/r.mp3 "HTTP/1.1 200 OK"'
    ]


async def test_a_repeated_page_token_is_an_error_not_the_last_page() -> None:
    # A listing that stopped there would be taken as complete (and the nightly window recorded).
    def handler(request: httpx.Request) -> httpx.Response:
        item = {"id": "00000000-0000-4000-8000-000000000001", "createdAt": "2026-11-30T01:00:00Z"}
        return httpx.Response(200, json={"results": [item], "nextPageToken": "same"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        client = BirdClient(
            http,
            api_url="https://api.bird.test",
            workspace_id="ws",
            access_key=SecretStr("k"),
            pacer=RequestPacer(1000),
        )
        listed: list[str] = []
        with pytest.raises(PayloadError, match="repeated its page token"):
            async for payload in client.list_recordings():
                listed.append(payload["id"])
    assert len(listed) == 2  # both pages' items were yielded before the repeat was seen
