"""The S3 media store against moto's standalone server over real HTTP (and a fault proxy)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
from botocore.exceptions import ClientError

from recarchive.errors import (
    MediaConflictError,
    MediaIntegrityError,
    ServerError,
    StorageUnavailableError,
    TransportError,
)
from recarchive.media.keys import media_key, sidecar_key
from recarchive.media.s3 import MediaStore, ObjectInfo
from recarchive.media.s3client import build_s3_client, translate_error
from tests.fixtures.s3 import SseCase
from tests.fixtures.s3_proxy import FaultProxy, ScriptedSchedule, SeededSchedule

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

MiB = 1024 * 1024
FRAME = b"\xff\xfb\x90\x64" + bytes(413)


def mp3_bytes(size: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-MP3 bytes (frame sync first, then varied content)."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048
    return (FRAME + block * (size // len(block) + 1))[:size]


def write(tmp_path: Path, data: bytes, name: str = "media.mp3") -> tuple[Path, str]:
    path = tmp_path / name
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def small_store(s3: S3Client, bucket: str, **kwargs: Any) -> MediaStore:
    # S3's minimum part size is 5 MiB; a 1 MiB threshold sends 6+ MiB files as multipart.
    options: dict[str, Any] = {"multipart_threshold": 1 * MiB, "multipart_chunk_size": 5 * MiB}
    options.update(kwargs)
    return MediaStore(s3, bucket=bucket, **options)


# --- keys ------------------------------------------------------------------------------------


def test_media_key_uses_utc_date_of_created_at() -> None:
    created = datetime(2024, 3, 1, 1, 30, tzinfo=timezone(timedelta(hours=5)))  # Feb 29 UTC
    key = media_key("recordings", "ws-1", "rec-1", created)
    assert key == "recordings/ws-1/2024/02/29/rec-1.mp3"
    assert sidecar_key(key) == "recordings/ws-1/2024/02/29/rec-1.json"


def test_media_key_without_prefix_has_no_leading_slash() -> None:
    created = datetime(2023, 12, 31, 23, 59, tzinfo=UTC)
    assert media_key("", "ws", "r", created) == "ws/2023/12/31/r.mp3"
    assert media_key("/a/b/", "ws", "r", created) == "a/b/ws/2023/12/31/r.mp3"


# --- single PUT ------------------------------------------------------------------------------


def test_single_put_stores_bytes_metadata_and_checksum(
    s3_client: S3Client, s3_bucket: str, tmp_path: Path
) -> None:
    sent: list[dict[str, str]] = []
    s3_client.meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: sent.append(dict(request.headers))
    )
    store = MediaStore(s3_client, bucket=s3_bucket)
    data = mp3_bytes(300_000)
    path, digest = write(tmp_path, data)
    assert store.upload_file("a/b.mp3", path, size=len(data), sha256_hex=digest) == "uploaded"

    # moto does not check checksums: prove what went over the wire instead.
    assert len(sent) == 1
    headers = {
        name.lower(): value.decode() if isinstance(value, bytes) else value
        for name, value in sent[0].items()
    }
    expected = base64.b64encode(hashlib.sha256(data).digest()).decode()
    assert headers["x-amz-checksum-sha256"] == expected
    assert headers["if-none-match"] == "*"
    head = s3_client.head_object(Bucket=s3_bucket, Key="a/b.mp3")
    assert head["ContentType"] == "audio/mpeg"
    assert head["Metadata"] == {"sha256": digest}
    assert store.head("a/b.mp3") == ObjectInfo(size=len(data), sha256=digest)
    body = s3_client.get_object(Bucket=s3_bucket, Key="a/b.mp3")["Body"].read()
    assert body == data
    assert store.hash_object("a/b.mp3") == (len(data), digest)
    assert store.list_open_multipart_uploads() == []


def test_head_of_missing_key_is_none(s3_client: S3Client, s3_bucket: str) -> None:
    assert MediaStore(s3_client, bucket=s3_bucket).head("nope.mp3") is None


def test_missing_bucket_is_storage_unavailable(s3_client: S3Client, tmp_path: Path) -> None:
    store = MediaStore(s3_client, bucket="no-such-bucket-here")
    path, digest = write(tmp_path, mp3_bytes(1000))
    with pytest.raises(StorageUnavailableError) as info:
        store.upload_file("k.mp3", path, size=1000, sha256_hex=digest)
    assert "NoSuchBucket" in str(info.value)


def test_sse_arguments_reach_s3(
    s3_client: S3Client, s3_bucket: str, tmp_path: Path, sse_case: SseCase
) -> None:
    store = small_store(s3_client, s3_bucket, sse=sse_case.sse, kms_key_id=sse_case.kms_key_id)
    small, small_digest = write(tmp_path, mp3_bytes(1000), "small.mp3")
    big_data = mp3_bytes(6 * MiB, seed=1)
    big, big_digest = write(tmp_path, big_data, "big.mp3")
    store.upload_file("small.mp3", small, size=1000, sha256_hex=small_digest)
    store.upload_file("big.mp3", big, size=len(big_data), sha256_hex=big_digest)
    store.put_bytes("small.json", b"{}")
    for key in ("small.mp3", "big.mp3", "small.json"):
        sse_case.assert_shown_by(s3_client.head_object(Bucket=s3_bucket, Key=key))


def test_sidecar_put_overwrites(s3_client: S3Client, s3_bucket: str) -> None:
    store = MediaStore(s3_client, bucket=s3_bucket)
    store.put_bytes("x.json", b'{"v": 1}')
    store.put_bytes("x.json", b'{"v": 2}')
    obj = s3_client.get_object(Bucket=s3_bucket, Key="x.json")
    assert obj["Body"].read() == b'{"v": 2}'
    assert obj["ContentType"] == "application/json"


# --- existing keys ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [4000, 6 * MiB], ids=["single", "multipart"])
def test_existing_key_with_same_bytes_is_already_present(
    s3_client: S3Client, s3_bucket: str, tmp_path: Path, size: int
) -> None:
    store = small_store(s3_client, s3_bucket)
    data = mp3_bytes(size)
    path, digest = write(tmp_path, data)
    assert store.upload_file("k.mp3", path, size=size, sha256_hex=digest) == "uploaded"
    assert store.upload_file("k.mp3", path, size=size, sha256_hex=digest) == "already_present"
    assert store.list_open_multipart_uploads() == []


@pytest.mark.parametrize("size", [4000, 6 * MiB], ids=["single", "multipart"])
def test_existing_key_with_other_bytes_is_a_conflict_and_untouched(
    s3_client: S3Client, s3_bucket: str, tmp_path: Path, size: int
) -> None:
    store = small_store(s3_client, s3_bucket)
    original = mp3_bytes(size, seed=1)
    path, digest = write(tmp_path, original, "one.mp3")
    store.upload_file("k.mp3", path, size=size, sha256_hex=digest)

    other = mp3_bytes(size, seed=2)
    other_path, other_digest = write(tmp_path, other, "two.mp3")
    with pytest.raises(MediaConflictError) as info:
        store.upload_file("k.mp3", other_path, size=size, sha256_hex=other_digest)
    assert digest in str(info.value) and other_digest in str(info.value)
    assert s3_client.get_object(Bucket=s3_bucket, Key="k.mp3")["Body"].read() == original
    assert store.list_open_multipart_uploads() == []


def test_concurrent_uploads_of_one_key_store_it_once(
    s3_client: S3Client, s3_bucket: str, tmp_path: Path
) -> None:
    store = MediaStore(s3_client, bucket=s3_bucket)
    data = mp3_bytes(200_000)
    path, digest = write(tmp_path, data)
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(
            pool.map(
                lambda _: store.upload_file("k.mp3", path, size=len(data), sha256_hex=digest),
                range(8),
            )
        )
    assert sorted(outcomes).count("uploaded") >= 1
    assert set(outcomes) <= {"uploaded", "already_present"}
    assert store.hash_object("k.mp3") == (len(data), digest)


# --- multipart ---------------------------------------------------------------------------------


def test_multipart_upload_parts_and_integrity(
    s3_client: S3Client, s3_bucket: str, tmp_path: Path
) -> None:
    store = small_store(s3_client, s3_bucket)
    data = mp3_bytes(11 * MiB + 123)
    path, digest = write(tmp_path, data)
    assert store.upload_file("m.mp3", path, size=len(data), sha256_hex=digest) == "uploaded"
    etag = s3_client.head_object(Bucket=s3_bucket, Key="m.mp3")["ETag"]
    assert etag.strip('"').endswith("-3")  # a multipart object of three parts
    assert store.head("m.mp3") == ObjectInfo(size=len(data), sha256=digest)
    assert store.hash_object("m.mp3") == (len(data), digest)
    assert store.list_open_multipart_uploads() == []


class FailingPartClient:
    """Wraps a real client; ``upload_part`` number ``fail_at`` raises a 403 (not retried)."""

    def __init__(self, real: S3Client, fail_at: int) -> None:
        self.real = real
        self.fail_at = fail_at
        self.aborted: list[str] = []

    def upload_part(self, **kwargs: Any) -> Any:
        if kwargs["PartNumber"] == self.fail_at:
            raise ClientError(
                cast(
                    Any,
                    {
                        "Error": {"Code": "AccessDenied", "Message": "no"},
                        "ResponseMetadata": {"HTTPStatusCode": 403},
                    },
                ),
                "UploadPart",
            )
        return self.real.upload_part(**kwargs)

    def abort_multipart_upload(self, **kwargs: Any) -> Any:
        self.aborted.append(kwargs["UploadId"])
        return self.real.abort_multipart_upload(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_failed_multipart_is_aborted(s3_client: S3Client, s3_bucket: str, tmp_path: Path) -> None:
    client = FailingPartClient(s3_client, fail_at=2)
    store = small_store(client, s3_bucket)  # type: ignore[arg-type]
    data = mp3_bytes(11 * MiB)
    path, digest = write(tmp_path, data)
    with pytest.raises(StorageUnavailableError):
        store.upload_file("m.mp3", path, size=len(data), sha256_hex=digest)
    assert len(client.aborted) == 1
    assert store.list_open_multipart_uploads() == []
    assert store.head("m.mp3") is None


class PutRewritingClient:
    """The real client, except that ``rewrite`` changes the arguments of each ``put_object``."""

    def __init__(self, real: S3Client, rewrite: Callable[[dict[str, Any]], None]) -> None:
        self.real = real
        self.rewrite = rewrite

    def put_object(self, **kwargs: Any) -> Any:
        self.rewrite(kwargs)
        return self.real.put_object(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_post_upload_verification_catches_a_wrong_object(
    s3_client: S3Client, s3_bucket: str, tmp_path: Path
) -> None:
    def store_garbage(kwargs: dict[str, Any]) -> None:
        # Other bytes than it was given: what a silent corruption would look like.
        kwargs["Body"] = b"garbage"
        kwargs.pop("ChecksumSHA256")

    client = PutRewritingClient(s3_client, store_garbage)
    store = MediaStore(client, bucket=s3_bucket)  # type: ignore[arg-type]
    data = mp3_bytes(5000)
    path, digest = write(tmp_path, data)
    with pytest.raises(MediaIntegrityError, match="stored size 7 != uploaded 5000"):
        store.upload_file("k.mp3", path, size=len(data), sha256_hex=digest)


def test_post_upload_verification_checks_sha256_metadata(
    s3_client: S3Client, s3_bucket: str, tmp_path: Path
) -> None:
    def store_wrong_metadata(kwargs: dict[str, Any]) -> None:
        kwargs["Metadata"] = {"sha256": "0" * 64}

    client = PutRewritingClient(s3_client, store_wrong_metadata)
    store = MediaStore(client, bucket=s3_bucket)  # type: ignore[arg-type]
    data = mp3_bytes(5000)
    path, digest = write(tmp_path, data)
    with pytest.raises(MediaIntegrityError, match="sha256 metadata"):
        store.upload_file("k.mp3", path, size=len(data), sha256_hex=digest)


# --- error translation -----------------------------------------------------------------------


def test_translate_error_kinds() -> None:
    def client_error(code: str, status: int) -> ClientError:
        return ClientError(
            cast(Any, {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}),
            "PutObject",
        )

    assert isinstance(translate_error(client_error("SlowDown", 503), "x"), ServerError)
    assert isinstance(translate_error(client_error("InternalError", 500), "x"), ServerError)
    assert isinstance(translate_error(client_error("BadDigest", 400), "x"), MediaIntegrityError)
    assert isinstance(
        translate_error(client_error("AccessDenied", 403), "x"), StorageUnavailableError
    )
    from botocore.exceptions import ConnectionClosedError

    dropped = ConnectionClosedError(endpoint_url="http://h/b/k?X-Amz-Signature=secret")
    error = translate_error(dropped, "put s3://b/k")
    assert isinstance(error, TransportError)
    assert "secret" not in str(error)


# --- faults through the proxy ----------------------------------------------------------------


def proxied_store(proxy: FaultProxy, bucket: str, **kwargs: Any) -> MediaStore:
    client = build_s3_client(
        endpoint_url=proxy.url,
        request_checksum_calculation="when_supported",
        max_pool_connections=16,
    )
    return small_store(client, bucket, **kwargs)


@pytest.mark.parametrize(
    "script",
    [
        ["error_500", "slowdown"],
        ["drop_before", "drop_before"],
        ["drop_after"],
        ["slowdown", "drop_after", "error_500"],
    ],
)
def test_single_put_survives_faults(
    s3_fault_proxy: FaultProxy,
    s3_client: S3Client,
    s3_bucket: str,
    tmp_path: Path,
    script: list[Any],
) -> None:
    store = proxied_store(s3_fault_proxy, s3_bucket)
    s3_fault_proxy.schedule = ScriptedSchedule(script, match=lambda r: r.method == "PUT")
    data = mp3_bytes(100_000)
    path, digest = write(tmp_path, data)
    outcome = store.upload_file("k.mp3", path, size=len(data), sha256_hex=digest)
    # A dropped answer to a PUT that landed: the retry meets 412, and HEAD proves the bytes.
    assert outcome == ("already_present" if "drop_after" in script else "uploaded")
    assert s3_fault_proxy.faults() == len(script)
    assert store.hash_object("k.mp3") == (len(data), digest)


@pytest.mark.parametrize(
    "script",
    [
        ["error_500", "pass", "slowdown"],  # create fails, then part 2 slows down
        ["pass", "drop_before", "pass", "drop_after"],  # parts dropped before/after S3 saw them
        ["pass", "pass", "pass", "drop_after"],
    ],  # the completion's answer is lost
)
def test_multipart_survives_faults(
    s3_fault_proxy: FaultProxy,
    s3_client: S3Client,
    s3_bucket: str,
    tmp_path: Path,
    script: list[Any],
) -> None:
    store = proxied_store(s3_fault_proxy, s3_bucket)
    s3_fault_proxy.schedule = ScriptedSchedule(script, match=lambda r: r.method in {"PUT", "POST"})
    data = mp3_bytes(11 * MiB)
    path, digest = write(tmp_path, data)
    assert store.upload_file("m.mp3", path, size=len(data), sha256_hex=digest) == "uploaded"
    assert s3_fault_proxy.faults() == len([a for a in script if a != "pass"])
    assert store.hash_object("m.mp3") == (len(data), digest)
    assert store.list_open_multipart_uploads() == []


def test_many_uploads_through_seeded_faults_each_complete_exactly_once(
    s3_fault_proxy: FaultProxy, s3_client: S3Client, s3_bucket: str, tmp_path: Path
) -> None:
    # With versioning on, a second write of a key would leave a second version behind.
    s3_client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    store = proxied_store(s3_fault_proxy, s3_bucket)
    s3_fault_proxy.schedule = SeededSchedule(seed=1234, rate=0.35)
    files: dict[str, tuple[Path, int, str]] = {}
    for number in range(24):
        size = 6 * MiB if number % 8 == 0 else 50_000 + number * 1000
        data = mp3_bytes(size, seed=number)
        path, digest = write(tmp_path, data, f"{number}.mp3")
        files[f"rec/{number}.mp3"] = (path, size, digest)

    def upload(key: str) -> str:
        path, size, digest = files[key]
        return store.upload_file(key, path, size=size, sha256_hex=digest)

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(upload, files))
    assert set(outcomes) <= {"uploaded", "already_present"}
    assert s3_fault_proxy.faults() >= 10
    listed = s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert sorted(obj["Key"] for obj in listed) == sorted(files)
    versions = s3_client.list_object_versions(Bucket=s3_bucket).get("Versions", [])
    assert len(versions) == len(files)  # no key was ever written twice
    for key, (_, size, digest) in files.items():
        assert store.hash_object(key) == (size, digest)
    assert store.list_open_multipart_uploads() == []


# --- crash leftovers ---------------------------------------------------------------------------


def test_open_uploads_of_the_key_are_aborted_before_a_multipart_upload(
    s3_client: S3Client, s3_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # What a run killed mid-upload leaves: open uploads of the key (and one of a longer key
    # sharing its prefix, which belongs to another object and must stay).
    for _ in range(2):
        s3_client.create_multipart_upload(Bucket=s3_bucket, Key="m.mp3")
    other = s3_client.create_multipart_upload(Bucket=s3_bucket, Key="m.mp3.bak")["UploadId"]
    store = small_store(s3_client, s3_bucket)
    data = mp3_bytes(6 * MiB)
    path, digest = write(tmp_path, data)
    assert store.upload_file("m.mp3", path, size=len(data), sha256_hex=digest) == "uploaded"
    assert store.list_open_multipart_uploads() == ["m.mp3.bak"]
    assert store.hash_object("m.mp3") == (len(data), digest)
    assert caplog.text.count("left open by an earlier run") == 2
    assert f"s3://{s3_bucket}/m.mp3" in caplog.text
    s3_client.abort_multipart_upload(Bucket=s3_bucket, Key="m.mp3.bak", UploadId=other)


def test_abort_open_uploads_reports_how_many(s3_client: S3Client, s3_bucket: str) -> None:
    store = small_store(s3_client, s3_bucket)
    assert store.abort_open_uploads("k.mp3") == 0
    s3_client.create_multipart_upload(Bucket=s3_bucket, Key="k.mp3")
    assert store.abort_open_uploads("k.mp3") == 1
    assert store.list_open_multipart_uploads() == []


def test_orphan_of_a_retried_create_is_aborted(
    s3_fault_proxy: FaultProxy, s3_client: S3Client, s3_bucket: str, tmp_path: Path
) -> None:
    # The first CreateMultipartUpload reaches S3 but its answer is lost: botocore creates a
    # second upload, and nobody knows the first one's id.
    store = proxied_store(s3_fault_proxy, s3_bucket)
    s3_fault_proxy.schedule = ScriptedSchedule(
        ["drop_after"], match=lambda r: r.method == "POST" and "uploads" in r.target
    )
    data = mp3_bytes(6 * MiB)
    path, digest = write(tmp_path, data)
    assert store.upload_file("m.mp3", path, size=len(data), sha256_hex=digest) == "uploaded"
    assert s3_fault_proxy.faults() == 1
    assert store.list_open_multipart_uploads() == []
    assert store.hash_object("m.mp3") == (len(data), digest)


def test_store_file_does_not_read_back_and_verify_stored_does(
    s3_client: S3Client, s3_bucket: str, tmp_path: Path
) -> None:
    store = small_store(s3_client, s3_bucket)
    data = mp3_bytes(50_000)
    path, digest = write(tmp_path, data)
    assert store.store_file("s.mp3", path, size=len(data), sha256_hex=digest) == "uploaded"
    store.verify_stored("s.mp3", size=len(data), sha256_hex=digest)
    with pytest.raises(MediaIntegrityError):
        store.verify_stored("s.mp3", size=len(data) + 1, sha256_hex=digest)
    with pytest.raises(MediaIntegrityError):
        store.verify_stored("absent.mp3", size=len(data), sha256_hex=digest)
