"""Generated hostile answers (hypothesis): no answer crashes a chunk, archives wrong bytes or leaks.

Each example scripts one answer of one recording — its metadata, its ``.mp3`` redirect or its
media body — from generated parts: a status line (valid or not), headers that may lie
(``Content-Length``, ``Transfer-Encoding``, checksums, ``Location``, ``Retry-After``, bytes
that are not header text), and a body (the real MP3, cut, extended, random bytes, JSON that is
deep, huge or wrong). It runs in a chunk beside one good recording. Whatever the answer:

* the chunk returns (only an API ``401``/``403`` stops it, with :class:`AuthError`);
* the good recording ends ``archived``; the hostile one ends in a ledger state, with a reason
  when ``failed``;
* an ``archived`` hostile recording holds exactly the bytes the answer's framing or checksum
  vouched for, and never a body whose end only the closing connection marked;
* no secret reaches the logs, the ledger, ``raw_json`` or S3.

Redirect targets are loopback (the server itself) or names only the tests' resolver knows, so
no generated answer can send traffic off this machine.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recarchive.bird.limits import AnswerLimits
from recarchive.config import Settings
from recarchive.errors import AuthError
from recarchive.media.s3 import MediaStore
from recarchive.redaction import install_log_redaction
from recarchive.run.database import open_store
from tests.fixtures.hostile import (
    FAKE_DNS,
    MEDIA_SIZE,
    HostileServer,
    Script,
    collect,
    good_media,
    good_payload,
    leaked,
    md5_hex,
    raw,
    run_chunk,
)

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

LIMITS = AnswerLimits(metadata_max_bytes=256 * 1024, media_max_bytes=512 * 1024)
EXAMPLES = 500

STAGES = ("metadata", "redirect", "media")
STATUSES = (200, 200, 200, 206, 204, 301, 302, 307, 400, 401, 403, 404, 410, 422, 429, 500, 503)
HEADER_NAMES = (
    "Content-Length",
    "Transfer-Encoding",
    "Location",
    "ETag",
    "Content-MD5",
    "x-amz-checksum-sha256",
    "x-amz-checksum-crc32",
    "Content-Type",
    "Retry-After",
    "Content-Encoding",
    "Content-Range",
    "X-Random",
)


@dataclass(frozen=True)
class Answer:
    """A generated answer, and what it vouches for."""

    stage: str
    status: int | None
    wire: bytes
    body: bytes
    #: The bytes the answer's framing or checksum vouches for (``None``: nothing).
    vouched: bytes | None


#: Names the tests' resolver maps to non-public addresses (never the public one: that would
#: be allowed, and the download would then ask the real resolver).
PRIVATE_NAMES = [host for host in FAKE_DNS if "public" not in host]


def locations(server: HostileServer, recording_id: str) -> st.SearchStrategy[str]:
    good = server.media_url(recording_id)
    return st.one_of(
        st.sampled_from(
            [
                good,
                good.replace("http://", "http://user:hunter2@"),
                good.replace("http://", "https://"),
                "https://[bad",
                "http://127.0.0.1:99999/x",
                "/relative/x.mp3",
                "",
                "ftp://127.0.0.1/x",
                *(f"http://{host}/x?X-Amz-Signature=1" for host in PRIVATE_NAMES),
                good + "\r\nX-Injected: 1",
                good.replace("/media/", "/media/%00"),
            ]
        ),
        # Generated text never holds a scheme: at worst a relative URL, never a new target.
        st.text(max_size=40).filter(lambda text: ":" not in text).map(lambda text: "x" + text),
    )


def bodies(stage: str, recording_id: str) -> st.SearchStrategy[bytes]:
    mp3 = good_media(recording_id)
    payload = json.dumps(good_payload(recording_id)).encode()
    return st.one_of(
        st.just(mp3 if stage == "media" else payload),
        st.integers(0, MEDIA_SIZE).map(lambda cut: (mp3 if stage == "media" else payload)[:cut]),
        st.binary(max_size=64).map(lambda extra: mp3 + extra),
        st.binary(max_size=2048),
        st.just(payload),
        st.integers(1, 70_000).map(lambda depth: b'{"a":' + b"[" * depth + b"]" * depth + b"}"),
        st.just(b"{" + b'"x": "' + b"y" * (LIMITS.metadata_max_bytes + 10) + b'"}'),
        st.just(payload[:-1] + b', "x": NaN}'),
        st.just(b'{"id": "' + recording_id.encode() + b'", "x": "\\ud800"}'),
    )


@st.composite
def answers(draw: st.DrawFn, server: HostileServer, recording_id: str) -> Answer:
    stage = draw(st.sampled_from(STAGES))
    body = draw(bodies(stage, recording_id))
    # Sometimes the body goes out gzip-compressed (honestly, or cut): every length and
    # checksum below then describes the compressed bytes, as HTTP has it.
    compressed = draw(st.sampled_from([None, None, None, None, "whole", "cut"]))
    if compressed is not None:
        body = gzip.compress(body, mtime=0)
        if compressed == "cut":
            body = body[: len(body) // 2]
    status: int | None = draw(st.sampled_from(STATUSES))
    if draw(st.booleans()) and draw(st.integers(0, 9)) == 0:
        status_line = draw(st.binary(max_size=40))
        status = None
    else:
        status_line = f"HTTP/1.1 {status} X".encode()
    headers: list[tuple[bytes, bytes]] = []
    framing = draw(st.sampled_from(["length", "none", "lie", "garbage", "chunked", "twice"]))
    vouched: bytes | None = None
    if framing == "length":
        headers.append((b"Content-Length", str(len(body)).encode()))
        vouched = body
    elif framing == "lie":
        claimed = max(0, len(body) + draw(st.integers(-500, 500).filter(lambda d: d != 0)))
        headers.append((b"Content-Length", str(claimed).encode()))
        vouched = body[:claimed] if claimed <= len(body) else None
    elif framing == "garbage":
        headers.append((b"Content-Length", draw(st.sampled_from([b"-1", b"12abc", b"", b"1e3"]))))
    elif framing == "twice":
        headers += [(b"Content-Length", str(len(body)).encode()), (b"Content-Length", b"1")]
    wire_body = body
    if framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        complete = draw(st.booleans())
        pieces = [body[i : i + 1000] for i in range(0, len(body), 1000)]
        if not complete:
            pieces = pieces[: len(pieces) // 2]
        wire_body = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces)
        if complete:
            wire_body += b"0\r\n\r\n"
            vouched = body
    if draw(st.booleans()):
        checksum = draw(st.sampled_from(["etag", "etag-wrong", "md5", "md5-wrong", "sha256"]))
        digest_of = body if not checksum.endswith("wrong") else body + b"!"
        if checksum.startswith("etag"):
            headers.append((b"ETag", f'"{md5_hex(digest_of)}"'.encode()))
            if framing == "none" and not checksum.endswith("wrong"):
                vouched = body
        elif checksum.startswith("md5"):
            value = base64.b64encode(hashlib.md5(digest_of).digest())
            headers.append((b"Content-MD5", value))
            if checksum.endswith("wrong"):
                vouched = None
            elif framing == "none":
                vouched = body
        else:
            value = base64.b64encode(hashlib.sha256(digest_of).digest())
            headers.append((b"x-amz-checksum-sha256", value))
            if framing == "none":
                vouched = body
    if stage == "redirect" or draw(st.integers(0, 4)) == 0:
        headers.append((b"Location", draw(locations(server, recording_id)).encode("utf-8")))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(HEADER_NAMES)).encode()
        value = draw(st.one_of(st.binary(max_size=30), st.sampled_from([b"0", b"120", b"gzip"])))
        headers.append((name, value))
    if compressed is not None:
        headers.append((b"Content-Encoding", b"gzip"))
        vouched = None  # compressed media is refused; metadata is decoded, never archived
    if status is None:
        vouched = None
    wire = status_line + b"\r\n"
    wire += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    wire += b"Connection: close\r\n\r\n" + wire_body
    return Answer(stage=stage, status=status, wire=wire, body=body, vouched=vouched)


def test_no_generated_answer_crashes_a_chunk_or_leaks(
    hostile: HostileServer,
    tmp_path: Path,
    s3_client: S3Client,
    s3_bucket: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    install_log_redaction()
    caplog.set_level(logging.INFO)
    engine, store = open_store(Settings(database_url=f"sqlite:///{tmp_path / 'archive.db'}"))
    media = MediaStore(s3_client, bucket=s3_bucket)
    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir()
    seen: dict[str, int] = {}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(data=st.data())
    def example(data: st.DataObject) -> None:
        bad, good = str(uuid.uuid4()), str(uuid.uuid4())
        answer = data.draw(answers(hostile, bad))
        seen[answer.stage] = seen.get(answer.stage, 0) + 1
        hostile.scripts[bad] = Script(**{answer.stage: raw(answer.wire)})
        first_record = len(caplog.records)
        stops_the_run = answer.stage != "media" and answer.status in (401, 403)
        try:
            counts: Any = asyncio.run(
                asyncio.wait_for(
                    run_chunk(
                        hostile,
                        [bad, good],
                        store=store,
                        media=media,
                        limits=LIMITS,
                        temp_dir=temp_dir,
                        http_timeout=1.0,
                    ),
                    timeout=20,
                )
            )
        except AuthError:
            assert stops_the_run, "only a 401/403 of the API stops the run"
            return
        finally:
            del hostile.scripts[bad]
        outcome = collect(store, media, [bad, good])
        if stops_the_run:
            # A 401/403 the HTTP parser refused (a malformed header) is a malformed answer,
            # not Bird refusing our key: that recording fails, the run goes on.
            assert "malformed answer" in str(outcome.entries[bad].last_error)
        assert outcome.entries[good].state == "archived", outcome.entries[good]
        entry = outcome.entries[bad]
        assert entry.state in {"archived", "failed", "missing", "metadata_only"}
        if entry.state == "failed":
            assert entry.last_error
        stored = [body for key, body in outcome.objects.items() if key.endswith(f"{bad}.mp3")]
        if entry.state == "archived":
            expected = good_media(bad) if answer.stage != "media" else answer.vouched
            assert expected is not None, "archived a body nothing vouched for"
            assert stored == [expected]
            assert entry.sha256 == hashlib.sha256(expected).hexdigest()
        else:
            assert stored == []
        records = caplog.records[first_record:]
        texts = [
            *(record.getMessage() + (record.exc_text or "") for record in records),
            *(str(e.last_error) for e in outcome.entries.values()),
            *outcome.raw_json.values(),
            *(body.decode("latin-1") for body in outcome.objects.values()),
            repr(counts.failures),
        ]
        assert leaked(*texts) == []
        for seen_request in hostile.media_requests():
            assert "authorization" not in seen_request.headers

    try:
        example()
        archived = store.counts().get("archived", 0)
    finally:
        engine.dispose()
    # Nothing was stored outside the keys the examples looked at: an MP3 and a sidecar for
    # each archived recording, no more.
    listing = s3_client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
    assert sum(len(page.get("Contents", [])) for page in listing) == 2 * archived
    # Every stage was tried many times (hypothesis spreads the draws).
    assert all(seen.get(stage, 0) >= EXAMPLES // 10 for stage in STAGES), seen
