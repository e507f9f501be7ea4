"""One misbehaving answer fails one recording, with a clear reason; nothing wrong is archived.

Each case scripts one of the three answers of one recording (its metadata, its ``.mp3``
redirect, or the media body) on the hostile server (tests/fixtures/hostile.py) and runs it in
a chunk with two good recordings. Every case asserts:

* the chunk finishes (no exception), and the two good recordings end ``archived``;
* the hostile recording ends in the expected state with the expected reason in ``last_error``
  — or ``archived`` with exactly the bytes of the good MP3, where the answer was honest;
* nothing else is in S3 for it, and no secret (the access key, the presigned signature, URL
  user info) is in the logs, the ledger, ``raw_json``, the sidecars or the counts.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from recarchive.bird.limits import AnswerLimits
from recarchive.config import Settings
from recarchive.media.s3 import MediaStore
from recarchive.redaction import install_log_redaction
from recarchive.run.database import open_store
from tests.fixtures.hostile import (
    MEDIA_SIZE,
    SIGNATURE,
    HostileServer,
    Script,
    chunked,
    collect,
    endless,
    good_media,
    good_payload,
    hostile_bird,
    leaked,
    md5_hex,
    raw,
    response,
    run_chunk,
    stall,
    trickle,
)

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

    from recarchive.store.archive import ArchiveStore

LIMITS = AnswerLimits(
    metadata_max_bytes=1024 * 1024,
    media_max_bytes=1024 * 1024,
    low_speed_bytes=1024,
    low_speed_seconds=0.5,
    answer_seconds=2.5,
)
AUDIO = [("Content-Type", "audio/mpeg")]
GZIP = [("Content-Encoding", "gzip")]


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def metadata(body: bytes, *, headers: list[tuple[str, str]] | None = None) -> Any:
    return raw(response(200, [("Content-Type", "application/json"), *(headers or [])], body))


def payload_bytes(recording_id: str, **changes: Any) -> bytes:
    return json.dumps(good_payload(recording_id, **changes)).encode()


def deep_json(recording_id: str, depth: int) -> bytes:
    head = payload_bytes(recording_id)[:-1]
    return head + b', "nested": ' + b"[" * depth + b"]" * depth + b"}"


@dataclass(frozen=True)
class Case:
    """One hostile answer and what it must lead to."""

    script: Callable[[str, HostileServer], Script]
    state: str
    reason: str = ""
    limits: AnswerLimits = LIMITS


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def half(recording_id: str) -> bytes:
    return good_media(recording_id)[: MEDIA_SIZE // 2]


CASES: dict[str, Case] = {
    # --- media bodies whose end only the closing connection marks -----------------------------
    "media-no-length-closed-early": Case(
        lambda rid, _: Script(media=raw(response(200, AUDIO, half(rid), content_length=False))),
        "failed",
        "no Content-Length and no checksum",
    ),
    "media-no-length-whole-but-unconfirmed": Case(
        lambda rid, _: Script(
            media=raw(response(200, AUDIO, good_media(rid), content_length=False))
        ),
        "failed",
        "cannot be told from a cut-off download",
    ),
    "media-no-length-etag-md5-confirms": Case(
        lambda rid, _: Script(
            media=raw(
                response(
                    200,
                    [*AUDIO, ("ETag", f'"{md5_hex(good_media(rid))}"')],
                    good_media(rid),
                    content_length=False,
                )
            )
        ),
        "archived",
    ),
    "media-no-length-etag-md5-closed-early": Case(
        lambda rid, _: Script(
            media=raw(
                response(
                    200,
                    [*AUDIO, ("ETag", f'"{md5_hex(good_media(rid))}"')],
                    half(rid),
                    content_length=False,
                )
            )
        ),
        "failed",
        "ETag (an MD5) does not match",
    ),
    "media-no-length-content-md5-confirms": Case(
        lambda rid, _: Script(
            media=raw(
                response(
                    200,
                    [*AUDIO, ("Content-MD5", b64(hashlib.md5(good_media(rid)).digest()))],
                    good_media(rid),
                    content_length=False,
                )
            )
        ),
        "archived",
    ),
    "media-content-md5-wrong": Case(
        lambda rid, _: Script(
            media=raw(response(200, [*AUDIO, ("Content-MD5", b64(b"\0" * 16))], good_media(rid)))
        ),
        "failed",
        "Content-MD5 does not match",
    ),
    "media-checksum-sha256-wrong": Case(
        lambda rid, _: Script(
            media=raw(
                response(
                    200,
                    [*AUDIO, ("x-amz-checksum-sha256", b64(hashlib.sha256(b"x").digest()))],
                    good_media(rid),
                )
            )
        ),
        "failed",
        "x-amz-checksum-sha256 does not match",
    ),
    "media-checksum-header-malformed": Case(
        lambda rid, _: Script(
            media=raw(response(200, [*AUDIO, ("Content-MD5", "%%%")], good_media(rid)))
        ),
        "failed",
        "malformed Content-MD5",
    ),
    "media-chunked-complete": Case(
        lambda rid, _: Script(media=raw(chunked(AUDIO, good_media(rid), complete=True))),
        "archived",
    ),
    "media-chunked-cut-off": Case(
        lambda rid, _: Script(media=raw(chunked(AUDIO, good_media(rid), complete=False))),
        "failed",
        "download broke",
    ),
    "media-content-length-too-short": Case(
        lambda rid, _: Script(
            media=raw(
                response(
                    200,
                    [*AUDIO, ("Content-Length", str(MEDIA_SIZE * 2))],
                    good_media(rid),
                    content_length=False,
                )
            )
        ),
        "failed",
        "download broke",
    ),
    "media-content-length-garbage": Case(
        lambda rid, _: Script(
            media=raw(
                response(
                    200,
                    [*AUDIO, ("Content-Length", "12abc")],
                    good_media(rid),
                    content_length=False,
                )
            )
        ),
        "failed",
        "malformed answer",
    ),
    # --- size and speed limits ----------------------------------------------------------------
    "media-endless-without-length": Case(
        lambda rid, _: Script(
            media=endless(response(200, AUDIO, content_length=False), good_media(rid)[:16384])
        ),
        "failed",
        "RECARCHIVE_MEDIA_MAX_BYTES",
    ),
    "media-announced-over-limit": Case(
        lambda rid, _: Script(
            media=raw(
                response(
                    200,
                    [*AUDIO, ("Content-Length", str(LIMITS.media_max_bytes + 1))],
                    good_media(rid),
                    content_length=False,
                )
            )
        ),
        "failed",
        "more than the limit",
    ),
    # Nothing arrives any more: no speed check can run, only the transport's read timeout
    # (the request's timeout extension, bird.answer.new_request) ends the wait.
    "media-stalls-mid-body": Case(
        lambda rid, _: Script(
            media=stall(
                response(200, [*AUDIO, ("Content-Length", str(MEDIA_SIZE))], content_length=False),
                half(rid),
            )
        ),
        "failed",
        "ReadTimeout",
    ),
    "media-trickles": Case(
        lambda rid, _: Script(
            media=trickle(
                response(200, [*AUDIO, ("Content-Length", str(MEDIA_SIZE))], content_length=False),
                good_media(rid),
                every=0.1,
                size=40,
            )
        ),
        "failed",
        "slower than 1024 bytes/s",
    ),
    # --- malformed answers --------------------------------------------------------------------
    "media-malformed-header": Case(
        lambda rid, _: Script(
            media=raw(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nBad Header\x00: x\r\n\r\nhello")
        ),
        "failed",
        "TransportError",
    ),
    "media-malformed-status-line": Case(
        lambda rid, _: Script(media=raw(b"HTTP/1.1 two hundred\r\n\r\n")),
        "failed",
        "TransportError",
    ),
    "media-html-error-page": Case(
        lambda rid, _: Script(media=raw(response(200, [], b"<html>AccessDenied</html>"))),
        "failed",
        "not MPEG audio",
    ),
    "metadata-malformed-header": Case(
        lambda rid, _: Script(
            metadata=raw(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\x01\x02: \xff\r\n\r\n{}")
        ),
        "failed",
        "TransportError",
    ),
    # --- redirects ----------------------------------------------------------------------------
    "redirect-unparsable": Case(
        lambda rid, _: Script(redirect=raw(response(307, [("Location", "https://[bad")]))),
        "failed",
        "unparsable redirect",
    ),
    "redirect-userinfo": Case(
        lambda rid, server: Script(
            redirect=raw(
                response(
                    307,
                    [
                        (
                            "Location",
                            server.media_url(rid).replace("http://", "http://admin:hunter2@"),
                        )
                    ],
                )
            )
        ),
        "failed",
        "user info",
    ),
    "redirect-link-local-metadata-service": Case(
        lambda rid, _: Script(
            redirect=raw(
                response(307, [("Location", "http://metadata.hostile.invalid/latest/meta-data/")])
            )
        ),
        "failed",
        "link-local address",
    ),
    "redirect-private-network": Case(
        lambda rid, _: Script(
            redirect=raw(
                response(307, [("Location", "https://intranet.hostile.invalid/x.mp3?sig=1")])
            )
        ),
        "failed",
        "private address",
    ),
    "redirect-ipv4-mapped-link-local": Case(
        lambda rid, _: Script(
            redirect=raw(response(307, [("Location", "http://mapped.hostile.invalid/x")]))
        ),
        "failed",
        "link-local address",
    ),
    "redirect-relative": Case(
        lambda rid, _: Script(redirect=raw(response(307, [("Location", "/media/x.mp3")]))),
        "failed",
        "non-absolute",
    ),
    "redirect-missing-location": Case(
        lambda rid, _: Script(redirect=raw(response(307))),
        "failed",
        "non-absolute",
    ),
    "redirect-not-a-redirect": Case(
        lambda rid, _: Script(redirect=raw(response(200, [], b"{}"))),
        "failed",
        "expected a redirect",
    ),
    # --- metadata payloads --------------------------------------------------------------------
    "metadata-nested-60000-deep": Case(
        lambda rid, _: Script(metadata=metadata(deep_json(rid, 60_000))),
        "failed",
        "nests deeper",
    ),
    "metadata-nested-100-deep": Case(
        lambda rid, _: Script(metadata=metadata(deep_json(rid, 100))),
        "failed",
        "nests deeper than 64",
    ),
    "metadata-over-size-limit": Case(
        lambda rid, _: Script(
            metadata=metadata(payload_bytes(rid, filler="x" * (LIMITS.metadata_max_bytes + 1)))
        ),
        "failed",
        "RECARCHIVE_METADATA_MAX_BYTES",
    ),
    "metadata-over-size-limit-without-length": Case(
        lambda rid, _: Script(
            metadata=raw(
                response(
                    200,
                    [],
                    payload_bytes(rid, filler="x" * (LIMITS.metadata_max_bytes + 1)),
                    content_length=False,
                )
            )
        ),
        "failed",
        "refused unparsed",
    ),
    "metadata-not-json": Case(
        lambda rid, _: Script(metadata=metadata(b"<html>502 Bad Gateway</html>")),
        "failed",
        "not JSON",
    ),
    "metadata-nan": Case(
        lambda rid, _: Script(metadata=metadata(payload_bytes(rid)[:-1] + b', "x": NaN}')),
        "failed",
        "not JSON",
    ),
    "metadata-integer-of-5000-digits": Case(
        lambda rid, _: Script(
            metadata=metadata(payload_bytes(rid)[:-1] + b', "x": 1' + b"0" * 5000 + b"}")
        ),
        "failed",
        "not JSON",
    ),
    "metadata-lone-surrogate": Case(
        lambda rid, _: Script(metadata=metadata(payload_bytes(rid)[:-1] + b', "x": "\\ud800"}')),
        "failed",
        "lone surrogate",
    ),
    # --- compressed answers: decoded by us, bounded, checked to the end ---------------------
    "metadata-gzip-honest": Case(
        lambda rid, _: Script(metadata=metadata(gzipped(payload_bytes(rid)), headers=GZIP)),
        "archived",
    ),
    "metadata-gzip-bomb": Case(
        lambda rid, _: Script(
            metadata=metadata(gzipped(payload_bytes(rid, x="0" * 3_000_000)), headers=GZIP)
        ),
        "failed",
        "inflates beyond",
    ),
    "metadata-gzip-twice": Case(
        lambda rid, _: Script(
            metadata=metadata(
                gzipped(gzipped(payload_bytes(rid))),
                headers=[("Content-Encoding", "gzip, gzip")],
            )
        ),
        "failed",
        "unsupported Content-Encoding",
    ),
    "metadata-gzip-cut-off": Case(
        lambda rid, _: Script(
            metadata=metadata(gzipped(payload_bytes(rid) * 50)[:300], headers=GZIP)
        ),
        "failed",
        "ends early",
    ),
    "media-gzip": Case(
        lambda rid, _: Script(media=raw(response(200, [*AUDIO, *GZIP], gzipped(good_media(rid))))),
        "failed",
        "compressed media",
    ),
    # --- slow answers ---------------------------------------------------------------------
    "metadata-trickles": Case(
        lambda rid, _: Script(
            metadata=trickle(
                response(200, [("Content-Length", "400000")], content_length=False),
                b" " * 400_000,
                every=0.1,
                size=40,
            )
        ),
        "failed",
        "slower than 1024 bytes/s",
    ),
    "redirect-headers-trickle": Case(
        lambda rid, server: Script(
            redirect=trickle(
                b"", response(307, [("Location", server.media_url(rid))]), every=0.4, size=20
            )
        ),
        "failed",
        "no whole answer within",
    ),
    "metadata-status-with-signed-url": Case(
        lambda rid, _: Script(
            metadata=metadata(
                payload_bytes(
                    rid,
                    status=f"processing https://b.s3/x?X-Amz-Signature={SIGNATURE}",
                    originator={
                        "number": {"callerIdName": f"https://admin:hunter2@h/?sig={SIGNATURE}"}
                    },
                )
            )
        ),
        "metadata_only",
    ),
    "metadata-signed-url-inside-text": Case(
        lambda rid, _: Script(
            metadata=metadata(
                payload_bytes(
                    rid,
                    note=f" see https://bucket.s3.amazonaws.com/a.mp3?X-Amz-Signature={SIGNATURE}",
                    links={"download": f"https://admin:hunter2@media.example/x?sig={SIGNATURE}"},
                )
            )
        ),
        "archived",
    ),
}


@dataclass
class Harness:
    store: ArchiveStore
    media: MediaStore
    temp_dir: Path
    engine: Any = field(repr=False)


@pytest.fixture
def harness(tmp_path: Path, s3_client: S3Client, s3_bucket: str) -> Iterator[Harness]:
    engine, store = open_store(Settings(database_url=f"sqlite:///{tmp_path / 'archive.db'}"))
    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir()
    try:
        yield Harness(store, MediaStore(s3_client, bucket=s3_bucket), temp_dir, engine)
    finally:
        engine.dispose()


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
async def test_one_hostile_answer_fails_one_recording(
    name: str,
    hostile: HostileServer,
    harness: Harness,
    caplog: pytest.LogCaptureFixture,
) -> None:
    install_log_redaction()
    caplog.set_level(logging.DEBUG)
    case = CASES[name]
    bad, *good = (str(uuid.uuid4()) for _ in range(3))
    hostile.scripts[bad] = case.script(bad, hostile)
    before = len(hostile.requests)

    counts = await run_chunk(
        hostile,
        [bad, *good],
        store=harness.store,
        media=harness.media,
        limits=case.limits,
        temp_dir=harness.temp_dir,
    )

    outcome = collect(harness.store, harness.media, [bad, *good])
    for recording_id in good:
        assert outcome.entries[recording_id].state == "archived", outcome.entries[recording_id]
    entry = outcome.entries[bad]
    assert entry.state == case.state, entry.last_error
    if case.state == "failed":
        assert case.reason in (entry.last_error or ""), entry.last_error
        assert not [key for key in outcome.objects if bad in key], "nothing stored for it"
    if case.state == "archived":
        mp3 = next(body for key, body in outcome.objects.items() if key.endswith(f"{bad}.mp3"))
        assert mp3 == good_media(bad)
        assert entry.sha256 == hashlib.sha256(good_media(bad)).hexdigest()
    texts = [
        caplog.text,
        *(str(e.last_error) for e in outcome.entries.values()),
        *outcome.raw_json.values(),
        *outcome.columns,
        *(body.decode("latin-1") for body in outcome.objects.values()),
        repr(counts.failures),
    ]
    assert leaked(*texts) == []
    # The media host never got our key, and no request left loopback (nothing to see here
    # for refused redirects: they are refused before any connection is made).
    for seen in hostile.requests[before:]:
        if seen.path.startswith("/media/"):
            assert "authorization" not in seen.headers
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text or name in TRACEBACK_LOGGED


# Cases whose unexpected library exception is logged at DEBUG with its (redacted) traceback.
TRACEBACK_LOGGED: frozenset[str] = frozenset()


async def test_no_client_default_and_no_cookie_ever_travels(hostile: HostileServer) -> None:
    # The injected client's own headers and cookies, and cookies the API sets, never go out:
    # requests carry exactly what BirdClient gives them (bird.answer.new_request). The
    # transport keeps no cookie jar either (bird.http), which this test cannot show: aiohttp's
    # default jar already ignores cookies of IP-address hosts such as 127.0.0.1.
    from recarchive.bird.http import build_http_client

    rid = str(uuid.uuid4())
    cookie = [("Set-Cookie", "session=api-cookie-123; Path=/")]
    hostile.scripts[rid] = Script(
        metadata=raw(
            response(200, [("Content-Type", "application/json"), *cookie], payload_bytes(rid))
        ),
        redirect=raw(response(307, [("Location", hostile.media_url(rid)), *cookie])),
    )
    before = len(hostile.requests)
    http = build_http_client(timeout_seconds=2.0)
    http.headers["X-Injected-Default"] = "from-the-client"
    http.cookies.set("injected", "client-cookie-456")
    try:
        bird = hostile_bird(hostile, http)
        assert (await bird.get_recording(rid))["id"] == rid
        await bird.get_recording(rid)  # a second request, after the cookie was set
        async with bird.open_media(rid) as media:
            assert b"".join([chunk async for chunk in media.iter_bytes()]) == good_media(rid)
    finally:
        await http.aclose()
    seen = [request for request in hostile.requests[before:] if rid in request.path]
    assert [request.path.startswith("/media/") for request in seen].count(True) == 1
    for request in seen:
        assert "cookie" not in request.headers, request
        assert "x-injected-default" not in request.headers, request
        assert request.headers.get("user-agent") == "recarchive", request
        if request.path.startswith("/media/"):
            assert "authorization" not in request.headers, request
