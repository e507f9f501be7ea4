"""The requests BirdClient sends are the ones httpx would build, header for header.

``bird.answer.new_request`` builds a request without a body itself, and ``child_url`` appends
a path segment to a parsed URL without parsing the whole URL again; both only to save time
(docs/benchmarks.md). These tests compare them with httpx's own construction over generated
URLs, segments, parameters and headers.
"""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from recarchive.bird.answer import USER_AGENT, child_url, new_request
from recarchive.bird.client import BirdClient
from recarchive.errors import ClientRequestError
from recarchive.simulator.server import SimulatorServer
from tests.fixtures.postgres import free_port
from tests.fixtures.simulator import BirdClientFactory

CLIENT = httpx.AsyncClient(timeout=httpx.Timeout(7.0, connect=3.0))

BASES = [
    "http://127.0.0.1:8080/workspaces/ws/recordings",
    "https://api.bird.com/workspaces/6f1c2a34-8d0e-4b7a-9c11-2f5e8d3b7a10/recordings",
    "https://api.bird.com:443/x/recordings",
    "http://[::1]:9/recordings",
    "https://user:secret@api.example/recordings",
    "https://api.example/a%20b/recordings",
]
texts = st.text(st.characters(codec="utf-8"), max_size=20)
segments = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda u: f"{u}.mp3"),
    texts.filter(lambda t: t not in {"", ".", ".."}),
)
headers = st.dictionaries(
    st.from_regex(r"X-[A-Za-z0-9-]{1,12}", fullmatch=True),
    st.from_regex(r"[ -~]{0,20}", fullmatch=True),
    max_size=4,
)


def httpx_request(
    method: str, url: str | httpx.URL, headers: dict[str, str], params: dict[str, str] | None
) -> httpx.Request:
    """What new_request replaced: httpx's own construction of the same request."""
    return httpx.Request(
        method,
        url,
        params=params,
        headers={"User-Agent": USER_AGENT, **headers},
        extensions={"timeout": CLIENT.timeout.as_dict()},
    )


def assert_same(ours: httpx.Request, theirs: httpx.Request) -> None:
    assert ours.method == theirs.method
    assert ours.url == theirs.url and str(ours.url) == str(theirs.url)
    assert ours.headers.raw == theirs.headers.raw
    assert ours.content == theirs.content == b""
    assert ours.extensions == theirs.extensions


@pytest.mark.parametrize("base", BASES)
@given(segment=segments)
def test_child_url_is_the_parsed_url(base: str, segment: str) -> None:
    parsed = httpx.URL(base)
    expected = httpx.URL(f"{base}/{quote(segment, safe='')}")
    found = child_url(parsed, segment)
    assert found == expected
    assert (found.raw_path, found.netloc, found.query) == (
        expected.raw_path,
        expected.netloc,
        expected.query,
    )


@pytest.mark.parametrize(
    ("base", "segment"),
    [
        pytest.param(BASES[0], "", id="empty-segment"),
        pytest.param(BASES[0], ".", id="dot"),
        pytest.param(BASES[0], "..", id="dot-dot"),
        pytest.param("https://api.example/recordings?already=1", "abc", id="base-with-query"),
        pytest.param("https://api.example/recordings?", "abc", id="base-with-empty-query"),
        pytest.param("https://api.example/recordings#", "abc", id="base-with-empty-fragment"),
    ],
)
def test_child_url_refuses_what_is_not_a_child(base: str, segment: str) -> None:
    # httpx would resolve ".." to the parent, and put a segment after "?" into the query.
    with pytest.raises(ValueError):
        child_url(httpx.URL(base), segment)


def test_a_segment_too_long_for_a_url_is_refused_as_httpx_refuses_it() -> None:
    segment = "a" * 70_000
    with pytest.raises(httpx.InvalidURL) as theirs:
        httpx.URL(f"{BASES[0]}/{segment}")
    with pytest.raises(httpx.InvalidURL) as ours:
        child_url(httpx.URL(BASES[0]), segment)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("name", ["Host", "host", "HOST"])
def test_a_caller_s_host_header_is_placed_as_httpx_places_it(name: str) -> None:
    sent = {"Authorization": "AccessKey k", name: "other.example"}
    url = child_url(httpx.URL(BASES[1]), "abc")
    ours = new_request(CLIENT, "GET", url, headers=sent)
    assert_same(ours, httpx_request("GET", url, sent, None))
    assert [v for k, v in ours.headers.raw if k.lower() == b"host"] == [b"other.example"]


@pytest.mark.parametrize("recording_id", ["", ".", ".."], ids=["empty", "dot", "dot-dot"])
async def test_the_client_sends_nothing_for_an_id_that_names_no_recording(
    recording_id: str, simulator: SimulatorServer, bird_client_factory: BirdClientFactory
) -> None:
    client: BirdClient = bird_client_factory(simulator)
    simulator.clear_requests()
    with pytest.raises(ClientRequestError, match="not a recording ID"):
        await client.delete_recording(recording_id)
    with pytest.raises(ClientRequestError, match="not a recording ID"):
        await client.get_recording(recording_id)
    with pytest.raises(ClientRequestError, match="not a recording ID"):
        async with client.open_media(recording_id):
            pass
    assert simulator.api_requests() == []
    # The control: a real ID goes out, to its own path.
    real = simulator.dataset.available_ids()[0]
    await client.get_recording(real)
    assert [r.path for r in simulator.api_requests()] == [
        f"/workspaces/{simulator.config.workspace_id}/recordings/{real}"
    ]


@pytest.mark.parametrize("method", ["GET", "get", "DELETE", "HEAD", "POST", "PUT", "PATCH"])
@given(
    base=st.sampled_from(BASES),
    segment=segments,
    extra=headers,
    params=st.none() | st.dictionaries(texts, texts, max_size=3),
)
def test_new_request_is_httpx_s_request(
    method: str, base: str, segment: str, extra: dict[str, str], params: dict[str, str] | None
) -> None:
    sent = {"Authorization": "AccessKey k", "Accept-Encoding": "identity", **extra}
    url = child_url(httpx.URL(base), segment)
    assert_same(
        new_request(CLIENT, method, url, headers=sent, params=params),
        httpx_request(method.upper(), str(url), sent, params),
    )
    assert_same(
        new_request(CLIENT, method, str(url), headers=sent, params=params),
        httpx_request(method.upper(), str(url), sent, params),
    )


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_a_request_without_a_body_sends_none(transport: str) -> None:
    # request.content is what the aiohttp transport sends: b"" must not become a chunked body.
    from aiohttp import web

    from recarchive.bird.http import build_http_client

    seen: list[tuple[str | None, str | None, bytes]] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((request.headers.get("Transfer-Encoding"), request.headers.get("Host"), body))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    http = build_http_client(aiohttp=transport == "aiohttp")
    try:
        base = httpx.URL(f"http://127.0.0.1:{port}/recordings")
        for method in ("GET", "DELETE"):
            request = new_request(http, method, child_url(base, "abc"), headers={})
            response = await http.send(request)
            assert response.status_code == 200
            await response.aclose()
    finally:
        await http.aclose()
        await runner.cleanup()
    assert seen == [(None, f"127.0.0.1:{port}", b"")] * 2
