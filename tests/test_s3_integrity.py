"""Integrity at the S3 server: a corrupted upload body is refused by SeaweedFS itself.

recarchive sends each body's SHA-256 as ``x-amz-checksum-sha256``; the request signature does
not cover the body (``UNSIGNED-PAYLOAD``), so only the server can notice bytes changed on the
way. A :class:`CorruptingProxy` (the suite's fault proxy, extended) flips one byte of a PUT
body after the client computed the checksum:

* SeaweedFS answers ``BadDigest``; :mod:`recarchive.media.s3` raises ``MediaIntegrityError``
  and nothing is stored. recarchive never reached its own read-back HEAD: the server refused.
* moto, the control, stores the corrupted bytes and answers 200. recarchive's read-back HEAD
  passes too, as it compares the size and the ``sha256`` metadata, both sent by the client; only
  reading the bytes back (``verify --deep``, the ``check_existing`` path) shows the damage.
  That is why the media and kill tests also run on SeaweedFS.

The last tests pin the server behaviour those tests rely on, on both servers:
``If-None-Match: *`` on an existing key is refused (412) and the store treats it as an
existing key, and a versioned bucket keeps one version per write (what the kill trials count).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from botocore.exceptions import ClientError

from recarchive.errors import MediaConflictError, MediaIntegrityError
from recarchive.media.s3 import MediaStore
from recarchive.media.s3client import build_s3_client
from tests.fixtures.s3_proxy import FaultProxy, _Handler

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

MiB = 1024 * 1024
KEY = "recordings/ws/2024/05/06/rec-1.mp3"
BIG = 6 * MiB  # above the 5 MiB multipart threshold below: a 5 MiB part and a 1 MiB part

Match = Callable[[str, str], bool]
_bucket_numbers = itertools.count()


def object_puts(method: str, target: str) -> bool:
    """Match writes of the media key: ``put_object`` and ``upload_part``."""
    return method == "PUT" and target.split("?", 1)[0].endswith(KEY)


def part_puts(method: str, target: str) -> bool:
    """Match ``upload_part`` only."""
    return object_puts(method, target) and "partNumber=" in target


class _CorruptingHandler(_Handler):
    """The fault proxy's handler, with one byte of a matching body flipped on the way."""

    def _forward(self, method: str, target: str, header_lines: list[bytes], body: bytes) -> bytes:
        proxy = self.server.proxy
        assert isinstance(proxy, CorruptingProxy)
        return super()._forward(
            method, target, header_lines, proxy.corrupt(method, target, header_lines, body)
        )


class CorruptingProxy(FaultProxy):
    """A :class:`FaultProxy` that also changes one byte of the body of matching requests.

    Headers (``Content-Length``, ``x-amz-checksum-sha256``, the signature) are forwarded as
    the client sent them, so the server sees a body of the announced length whose checksum is
    wrong: exactly what a bit flip on the wire looks like.

    Args:
        upstream: ``(host, port)`` of the real endpoint.
        match: ``match(method, target)`` picks the requests to corrupt.
    """

    def __init__(self, upstream: tuple[str, int], match: Match) -> None:
        super().__init__(upstream)
        # Everything else (framing, 100-continue, schedules, the log) is FaultProxy's own.
        self._server.RequestHandlerClass = _CorruptingHandler
        self.match = match
        self.corrupted: list[str] = []

    def corrupt(self, method: str, target: str, header_lines: list[bytes], body: bytes) -> bytes:
        """Return ``body`` with its middle byte flipped when the request matches."""
        chunked = any(
            line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower()
            for line in header_lines
        )
        # A chunked body's framing would be damaged instead of its data: never here, as
        # botocore sends Content-Length bodies with a checksum header over plain HTTP.
        if chunked or not body or not self.match(method, target):
            return body
        self.corrupted.append(target)
        middle = len(body) // 2
        return body[:middle] + bytes([body[middle] ^ 0x01]) + body[middle + 1 :]


@pytest.fixture
def corrupting_proxy() -> Iterator[Callable[[str, Match], CorruptingProxy]]:
    """Start a :class:`CorruptingProxy` in front of an endpoint URL; stopped after the test."""
    started: list[CorruptingProxy] = []

    def start(endpoint: str, match: Match) -> CorruptingProxy:
        host, _, port = endpoint.removeprefix("http://").partition(":")
        proxy = CorruptingProxy((host, int(port)), match)
        proxy.start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def s3_endpoint(any_s3_endpoint: str) -> str:
    """Tests using ``s3_client``/``s3_bucket`` run on each server (``[moto]``, ``[seaweedfs]``).

    The corruption tests name their server (``seaweedfs_endpoint``, ``moto_endpoint``)
    instead: they expect opposite outcomes.
    """
    return any_s3_endpoint


def new_store(endpoint: str) -> MediaStore:
    """A media store on a fresh bucket of ``endpoint`` (multipart from 5 MiB)."""
    client = build_s3_client(endpoint_url=endpoint, request_checksum_calculation="when_supported")
    bucket = f"recarchive-integrity-{os.getpid()}-{next(_bucket_numbers)}"
    client.create_bucket(Bucket=bucket)
    return MediaStore(
        client, bucket=bucket, multipart_threshold=5 * MiB, multipart_chunk_size=5 * MiB
    )


def through(proxy: FaultProxy, store: MediaStore) -> MediaStore:
    """The same bucket as ``store``, reached through ``proxy``."""
    client = build_s3_client(endpoint_url=proxy.url, request_checksum_calculation="when_supported")
    return MediaStore(
        client,
        bucket=store.bucket,
        multipart_threshold=store.multipart_threshold,
        multipart_chunk_size=store.multipart_chunk_size,
    )


def media_file(tmp_path: Path, size: int, seed: int) -> tuple[Path, str]:
    """Write ``size`` seeded random bytes; return the path and their hex SHA-256."""
    data = random.Random(seed).randbytes(size)
    path = tmp_path / f"media-{seed}.part"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


# --- a corrupted body: SeaweedFS refuses it, moto stores it ---------------------------------


@pytest.mark.parametrize("size", [200_000, BIG], ids=["single-put", "multipart"])
def test_seaweedfs_refuses_a_corrupted_body_itself(
    seaweedfs_endpoint: str,
    corrupting_proxy: Callable[[str, Match], CorruptingProxy],
    tmp_path: Path,
    size: int,
) -> None:
    store = new_store(seaweedfs_endpoint)
    proxy = corrupting_proxy(seaweedfs_endpoint, part_puts if size == BIG else object_puts)
    path, digest = media_file(tmp_path, size, seed=1)

    with pytest.raises(MediaIntegrityError, match="BadDigest"):
        through(proxy, store).upload_file(KEY, path, size=size, sha256_hex=digest)

    assert proxy.corrupted, "the proxy corrupted nothing: the test proved nothing"
    # The server refused: recarchive never got to its read-back HEAD, nothing was stored,
    # and the refused multipart upload was aborted.
    assert [info.method for info, _ in proxy.log if info.method == "HEAD"] == []
    assert store.head(KEY) is None
    assert store.list_open_multipart_uploads() == []


@pytest.mark.parametrize("size", [200_000, BIG], ids=["single-put", "multipart"])
def test_moto_stores_the_same_corrupted_body_control(
    moto_endpoint: str,
    corrupting_proxy: Callable[[str, Match], CorruptingProxy],
    tmp_path: Path,
    size: int,
) -> None:
    store = new_store(moto_endpoint)
    proxy = corrupting_proxy(moto_endpoint, part_puts if size == BIG else object_puts)
    path, digest = media_file(tmp_path, size, seed=1)

    outcome = through(proxy, store).upload_file(KEY, path, size=size, sha256_hex=digest)

    assert proxy.corrupted
    # moto took it, and the read-back HEAD passed: size and metadata are what the client sent.
    assert outcome == "uploaded"
    info = store.head(KEY)
    assert info is not None and (info.size, info.sha256) == (size, digest)
    # Only the bytes themselves tell: they are not the ones uploaded.
    stored_size, stored_digest = store.hash_object(KEY)
    assert stored_size == size and stored_digest != digest


def test_the_proxy_passes_other_requests_unchanged(
    seaweedfs_endpoint: str,
    corrupting_proxy: Callable[[str, Match], CorruptingProxy],
    tmp_path: Path,
) -> None:
    # Without a matching request the same path through the proxy stores the file intact.
    store = new_store(seaweedfs_endpoint)
    proxy = corrupting_proxy(seaweedfs_endpoint, lambda method, target: False)
    path, digest = media_file(tmp_path, BIG, seed=2)
    assert through(proxy, store).upload_file(KEY, path, size=BIG, sha256_hex=digest) == "uploaded"
    assert proxy.corrupted == []
    assert store.hash_object(KEY) == (BIG, digest)


# --- create-only writes and versions, on each server -----------------------------------------


def test_if_none_match_on_an_existing_key_is_refused(s3_client: S3Client, s3_bucket: str) -> None:
    s3_client.put_object(Bucket=s3_bucket, Key=KEY, Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as refused:
        s3_client.put_object(Bucket=s3_bucket, Key=KEY, Body=b"second", IfNoneMatch="*")
    error = refused.value.response
    assert error["Error"]["Code"] == "PreconditionFailed"
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert s3_client.get_object(Bucket=s3_bucket, Key=KEY)["Body"].read() == b"first"


@pytest.mark.parametrize("size", [200_000, BIG], ids=["single-put", "multipart"])
def test_store_treats_the_refused_write_as_an_existing_key(
    s3_client: S3Client, s3_bucket: str, tmp_path: Path, size: int
) -> None:
    store = MediaStore(
        s3_client, bucket=s3_bucket, multipart_threshold=5 * MiB, multipart_chunk_size=5 * MiB
    )
    path, digest = media_file(tmp_path, size, seed=3)
    assert store.upload_file(KEY, path, size=size, sha256_hex=digest) == "uploaded"
    # The same bytes again: the conditional write is refused, the HEAD shows they are there.
    assert store.upload_file(KEY, path, size=size, sha256_hex=digest) == "already_present"
    # Other bytes: refused, never overwritten (for multipart, at the completion).
    other, other_digest = media_file(tmp_path, size, seed=4)
    with pytest.raises(MediaConflictError, match="not overwritten"):
        store.upload_file(KEY, other, size=size, sha256_hex=other_digest)
    assert store.hash_object(KEY) == (size, digest)
    assert store.list_open_multipart_uploads() == []


def test_versioned_bucket_counts_writes_and_refused_writes_add_none(
    s3_client: S3Client, s3_bucket: str
) -> None:
    # The kill trials prove "archived exactly once" by counting versions: a second write of a
    # key must show as a second version, and a refused conditional write as none.
    s3_client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    s3_client.put_object(Bucket=s3_bucket, Key="once.mp3", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError, match="PreconditionFailed"):
        s3_client.put_object(Bucket=s3_bucket, Key="once.mp3", Body=b"2", IfNoneMatch="*")
    s3_client.put_object(Bucket=s3_bucket, Key="twice.mp3", Body=b"1")
    s3_client.put_object(Bucket=s3_bucket, Key="twice.mp3", Body=b"2")
    listed = s3_client.list_object_versions(Bucket=s3_bucket)
    keys = sorted(version["Key"] for version in listed.get("Versions", []))
    assert keys == ["once.mp3", "twice.mp3", "twice.mp3"]
    assert listed.get("DeleteMarkers", []) == []
