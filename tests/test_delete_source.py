"""``verify --delete-source-after-verify`` deletes at Bird only what the source confirms again.

The source is asked through a fresh redirect with a ``Range: bytes=0-0`` GET (real S3 refuses
a HEAD on a URL presigned for GET); deletion needs its ``Content-Range`` total to equal the
archived size, its ETag (when a plain MD5) to equal the archived bytes' MD5, and the archived
download to have had an independent length.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable

import httpx
import pytest

from recarchive.bird.http import build_http_client
from recarchive.media.verify import VerifiedObject
from recarchive.model import LedgerEntry
from recarchive.run.verify import delete_source_if_same
from tests.fixtures.hostile import (
    MEDIA_SIZE,
    HostileServer,
    Script,
    good_media,
    hostile_bird,
    md5_hex,
    raw,
    response,
)


def ranged(total: int, etag: str | None = None, status: int = 206) -> bytes:
    headers = [("Content-Range", f"bytes 0-0/{total}")]
    if etag is not None:
        headers.append(("ETag", f'"{etag}"'))
    return response(status, headers, b"\xff")


CASES: dict[str, tuple[Callable[[str], bytes], str | None, bool]] = {
    # id: (source answer, confirmed_by of the archived download, deleted?)
    "same-size-no-etag": (lambda rid: ranged(MEDIA_SIZE), "content-length", True),
    "same-size-same-md5": (
        lambda rid: ranged(MEDIA_SIZE, md5_hex(good_media(rid))),
        "content-length",
        True,
    ),
    "legacy-object-same-size": (lambda rid: ranged(MEDIA_SIZE), None, True),
    "source-larger": (lambda rid: ranged(MEDIA_SIZE * 2), "content-length", False),
    "source-smaller": (lambda rid: ranged(MEDIA_SIZE // 2), "content-length", False),
    "md5-differs": (lambda rid: ranged(MEDIA_SIZE, "0" * 32), "content-length", False),
    "range-ignored-200": (lambda rid: ranged(MEDIA_SIZE, status=200), "content-length", False),
    "no-content-range": (lambda rid: response(206, [], b"\xff"), "content-length", False),
    "unknown-total": (
        lambda rid: response(206, [("Content-Range", "bytes 0-0/*")], b"\xff"),
        "content-length",
        False,
    ),
    "archived-by-etag-only": (lambda rid: ranged(MEDIA_SIZE), "etag-md5", False),
    "archived-chunked": (lambda rid: ranged(MEDIA_SIZE), "chunked", False),
    "source-errors": (lambda rid: response(500), "content-length", False),
    "source-refuses-403": (lambda rid: response(403), "content-length", False),
    "source-refuses-401": (lambda rid: response(401), "content-length", False),
    "total-not-ascii-digits": (
        lambda rid: response(206, [("Content-Range", "bytes 0-0/\u00b2")], b"\xff"),
        "content-length",
        False,
    ),
    "total-too-long": (
        lambda rid: response(206, [("Content-Range", "bytes 0-0/" + "9" * 30)], b"\xff"),
        "content-length",
        False,
    ),
}


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
async def test_delete_source_only_when_it_matches(name: str, hostile: HostileServer) -> None:
    answer, confirmed_by, deleted = CASES[name]
    rid = str(uuid.uuid4())
    hostile.scripts[rid] = Script(media=raw(answer(rid)))
    entry = LedgerEntry(
        recording_id=rid,
        state="archived",
        attempts=1,
        last_error=None,
        next_attempt_at=None,
        s3_bucket="b",
        s3_key=f"k/{rid}.mp3",
        size_bytes=MEDIA_SIZE,
        sha256=hashlib.sha256(good_media(rid)).hexdigest(),
        archived_at=None,
        lease_owner=None,
        lease_expires_at=None,
    )
    verified = VerifiedObject(md5=md5_hex(good_media(rid)), confirmed_by=confirmed_by)
    http: httpx.AsyncClient = build_http_client(timeout_seconds=2)
    try:
        bird = hostile_bird(hostile, http)
        assert await delete_source_if_same(bird, entry, verified) is deleted
    finally:
        await http.aclose()
    deletes = [seen for seen in hostile.requests if seen.method == "DELETE" and rid in seen.path]
    assert len(deletes) == (1 if deleted else 0)
    ranges = [seen for seen in hostile.media_requests() if rid in seen.path]
    if confirmed_by in ("content-length", None):
        assert ranges and all(seen.headers.get("range") == "bytes=0-0" for seen in ranges)
        assert all("authorization" not in seen.headers for seen in ranges)
