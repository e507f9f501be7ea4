"""media.archive_media: download → verify → upload → sidecar, against real S3 servers over HTTP.

Every test that stores something runs twice: on moto and on SeaweedFS, whose S3 gateway
checks the ``x-amz-checksum-sha256`` of each body (moto does not), so what passes here was
accepted by a server that would have refused a corrupted upload.

Fake downloads cover each failure precisely; the last tests go through the real simulator
(redirect, media host, fault profiles) and the real Bird client.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from recarchive.errors import (
    MediaConflictError,
    MediaIntegrityError,
    NotFoundError,
    ServerError,
    StorageUnavailableError,
    TransportError,
)
from recarchive.media.keys import sidecar_key
from recarchive.media.locks import NO_LOCK, NO_RETENTION, Retention
from recarchive.media.s3 import MediaStore
from recarchive.media.spool import BUDGET
from recarchive.media.transfer import (
    MediaResult,
    archive_media,
    check_mpeg_audio,
)
from recarchive.simulator.mp3 import Mp3Source
from recarchive.tempfiles import remove_orphan_temp_files, temp_prefix

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

    from tests.fixtures.simulator import BirdClientFactory, SimulatorFactory

MiB = 1024 * 1024
KEY = "recordings/ws/2024/05/06/rec-1.mp3"
SIDECAR = b'{"id": "rec-1"}'


def mp3(size: int, key: str = "rec-1", id3: bool = True) -> bytes:
    return Mp3Source(key, size, with_id3=id3).read_all()


class FakeDownload:
    """A media body: ``chunks`` then, optionally, an error mid-body."""

    def __init__(
        self,
        chunks: Sequence[bytes] | Iterator[bytes],
        content_length: int | None,
        fail: Exception | None = None,
    ) -> None:
        self.recording_id = "rec-1"
        self.content_length = content_length
        self.content_type = "audio/mpeg"
        # As MediaDownload: set once the body was read whole, to what framed its end.
        self.confirmed_by: str | None = None
        self._chunks = chunks
        self._fail = fail

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk
        if self._fail is not None:
            raise self._fail
        self.confirmed_by = "content-length" if self.content_length is not None else "chunked"


class FakeBird:
    """``open_media`` answers from a script: a download, or an exception raised on open."""

    def __init__(self, *script: FakeDownload | Exception) -> None:
        self.script = list(script)
        self.opened = 0

    @asynccontextmanager
    async def open_media(self, recording_id: str) -> AsyncIterator[FakeDownload]:
        item = self.script[min(self.opened, len(self.script) - 1)]
        self.opened += 1
        if isinstance(item, Exception):
            raise item
        yield item


def good(data: bytes, chunk: int = 64 * 1024) -> FakeDownload:
    return FakeDownload([data[i : i + chunk] for i in range(0, len(data), chunk)], len(data))


@pytest.fixture
def s3_endpoint(any_s3_endpoint: str) -> str:
    """This module's S3 tests run on each server (``[moto]``, ``[seaweedfs]``)."""
    return any_s3_endpoint


@pytest.fixture
def store(s3_client: S3Client, s3_bucket: str) -> MediaStore:
    return MediaStore(
        s3_client, bucket=s3_bucket, multipart_threshold=5 * MiB, multipart_chunk_size=5 * MiB
    )


@pytest.fixture
def temp_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tmp"
    folder.mkdir()
    return folder


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("recarchive.media.transfer.RETRY_BASE_DELAY", 0.001)


@pytest.fixture(params=["memory", "file"])
def body_place(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Where the body waits for the upload: in memory (small ones), or in a temp file."""
    if request.param == "file":
        monkeypatch.setattr("recarchive.media.spool.MEMORY_BODY_BYTES", 0)
    return str(request.param)


@pytest.fixture(autouse=True)
def budget_given_back() -> Iterator[None]:
    """Whatever a test did, every byte of the memory budget is given back at its end."""
    yield
    assert BUDGET.used == 0


async def archive(bird: Any, store: MediaStore, temp_dir: Path, **kwargs: Any) -> MediaResult:
    return await archive_media(
        bird, store, recording_id="rec-1", key=KEY, sidecar=SIDECAR, temp_dir=temp_dir, **kwargs
    )


def leftovers(folder: Path) -> list[Path]:
    return list(folder.iterdir())


def stored(store: MediaStore, key: str = KEY) -> bytes | None:
    if store.head(key) is None:
        return None
    body: bytes = store.s3.get_object(Bucket=store.bucket, Key=key)["Body"].read()
    return body


# --- format check ----------------------------------------------------------------------------


@pytest.mark.parametrize("id3", [True, False])
def test_simulator_mp3_is_accepted(id3: bool) -> None:
    check_mpeg_audio(mp3(100_000, id3=id3)[:65536], "r")


def test_id3_tag_followed_by_padding_then_frame_is_accepted() -> None:
    tag = b"ID3\x04\x00\x00\x00\x00\x00\x05" + b"TIT2x" + b"\x00" * 30 + b"\xff\xfb\x90\x44"
    check_mpeg_audio(tag, "r")


def test_large_id3_tag_beyond_sniffed_bytes_is_accepted() -> None:
    check_mpeg_audio(b"ID3\x03\x00\x00\x00\x10\x00\x00" + b"\x01" * 100, "r")


@pytest.mark.parametrize(
    "body",
    [
        b"<!DOCTYPE html><html><body>Error</body></html>",
        b'<?xml version="1.0"?><Error><Code>AccessDenied</Code></Error>',
        b'{"error": "not found"}',
        b"",
        b"\xff",  # a lone byte
        b"\xff\x1b\x90\x44",  # 0xFF not followed by the remaining sync bits
        b"ID3\x03\x00\x00\x00\x00\x00\x04TIT2<html>",  # tag, then no frame
        b"ID3\x03\x00\x00\x80\x00\x00\x00",  # size byte not synchsafe
    ],
)
def test_non_mpeg_bytes_are_rejected(body: bytes) -> None:
    with pytest.raises(MediaIntegrityError):
        check_mpeg_audio(body, "r")


# --- success ----------------------------------------------------------------------------------


async def test_archive_stores_media_and_sidecar_and_removes_temp(
    store: MediaStore, temp_dir: Path, body_place: str
) -> None:
    data = mp3(300_000)
    bird = FakeBird(good(data))
    result = await archive(bird, store, temp_dir)
    digest = hashlib.sha256(data).hexdigest()
    assert result == MediaResult(
        bucket=store.bucket,
        key=KEY,
        size_bytes=len(data),
        sha256=digest,
        outcome="uploaded",
        archived_at=result.archived_at,
    )
    assert stored(store) == data
    assert stored(store, sidecar_key(KEY)) == SIDECAR
    info = store.head(KEY)
    assert info is not None and info.sha256 == digest
    # The object says when it was archived: the instant the ledger keeps (rebuild reads it).
    assert result.archived_at is not None and info.archived_at == result.archived_at
    assert leftovers(temp_dir) == []


async def test_content_length_unknown_is_fine(
    store: MediaStore, temp_dir: Path, body_place: str
) -> None:
    data = mp3(50_000, id3=False)
    result = await archive(FakeBird(FakeDownload([data], None)), store, temp_dir)
    assert result.size_bytes == len(data)
    assert stored(store) == data


async def test_multipart_sized_media(store: MediaStore, temp_dir: Path) -> None:
    data = mp3(12 * MiB)
    result = await archive(FakeBird(good(data, chunk=1 * MiB)), store, temp_dir)
    assert result.outcome == "uploaded"
    assert store.hash_object(KEY) == (len(data), hashlib.sha256(data).hexdigest())
    assert store.list_open_multipart_uploads() == []
    assert leftovers(temp_dir) == []


async def test_same_bytes_already_present(
    store: MediaStore, temp_dir: Path, body_place: str
) -> None:
    data = mp3(20_000)
    await archive(FakeBird(good(data)), store, temp_dir)
    again = await archive(FakeBird(good(data)), store, temp_dir)
    assert again.outcome == "already_present"
    assert again.sha256 == hashlib.sha256(data).hexdigest()


# --- retried, never stored ---------------------------------------------------------------------


async def test_truncated_body_is_retried_and_never_stored(
    store: MediaStore, temp_dir: Path, body_place: str
) -> None:
    data = mp3(200_000)
    truncated = FakeDownload([data[:150_000]], len(data))
    bird = FakeBird(truncated, good(data))
    result = await archive(bird, store, temp_dir)
    assert bird.opened == 2
    assert result.size_bytes == len(data)
    assert stored(store) == data
    assert leftovers(temp_dir) == []


async def test_body_breaking_off_is_retried(
    store: MediaStore, temp_dir: Path, body_place: str
) -> None:
    data = mp3(200_000)
    broken = FakeDownload([data[:70_000]], len(data), fail=TransportError("reset"))
    bird = FakeBird(broken, broken, good(data))
    result = await archive(bird, store, temp_dir)
    assert bird.opened == 3
    assert result.sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    "bad",
    [
        FakeDownload([b"<html><body>502 Bad Gateway</body></html>"], None),
        FakeDownload([mp3(10_000)[:4000]], 10_000),  # always truncated
        FakeDownload([mp3(10_000) + b"extra"], 10_000),  # longer than announced
    ],
    ids=["html", "truncated", "too-long"],
)
async def test_bad_media_is_never_stored(
    store: MediaStore, temp_dir: Path, bad: FakeDownload, body_place: str
) -> None:
    bird = FakeBird(bad)
    with pytest.raises(MediaIntegrityError):
        await archive(bird, store, temp_dir, attempts=3)
    assert bird.opened == 3
    assert store.head(KEY) is None
    assert store.head(sidecar_key(KEY)) is None
    assert leftovers(temp_dir) == []


async def test_errors_of_open_media_are_not_retried_again(
    store: MediaStore, temp_dir: Path
) -> None:
    # The Bird client retried that request already: one retry layer only.
    bird = FakeBird(ServerError("media host kept failing"), good(mp3(1000)))
    with pytest.raises(ServerError):
        await archive(bird, store, temp_dir)
    assert bird.opened == 1
    assert leftovers(temp_dir) == []


async def test_not_found_propagates(store: MediaStore, temp_dir: Path) -> None:
    bird = FakeBird(NotFoundError("gone"))
    with pytest.raises(NotFoundError):
        await archive(bird, store, temp_dir)
    assert bird.opened == 1
    assert leftovers(temp_dir) == []


async def test_conflict_keeps_original_and_removes_temp(
    store: MediaStore, temp_dir: Path, body_place: str
) -> None:
    original = mp3(30_000, key="a")
    await archive(FakeBird(good(original)), store, temp_dir)
    other = mp3(30_000, key="b")
    with pytest.raises(MediaConflictError):
        await archive(FakeBird(good(other)), store, temp_dir)
    assert stored(store) == original
    assert leftovers(temp_dir) == []


async def test_upload_failure_removes_temp(
    s3_client: S3Client, temp_dir: Path, body_place: str
) -> None:
    store = MediaStore(s3_client, bucket="no-such-bucket-media")
    with pytest.raises(StorageUnavailableError):
        await archive(FakeBird(good(mp3(5000))), store, temp_dir)
    assert leftovers(temp_dir) == []


@pytest.mark.parametrize(
    ("memory_limit", "files", "held"), [(0, 1, 0), (None, 0, 1000)], ids=["file", "memory"]
)
async def test_cancellation_mid_download_removes_temp(
    store: MediaStore, temp_dir: Path, memory_limit: int | None, files: int, held: int
) -> None:
    # The temp file is removed; a body in memory gives its budget back (budget_given_back).
    started = asyncio.Event()

    class Slow(FakeDownload):
        async def iter_bytes(self) -> AsyncIterator[bytes]:
            yield mp3(1000)
            started.set()
            await asyncio.sleep(30)
            yield b""

    bird = FakeBird(Slow([], None))
    task = asyncio.create_task(archive(bird, store, temp_dir, memory_limit=memory_limit))
    await asyncio.wait_for(started.wait(), 5)
    assert (len(leftovers(temp_dir)), BUDGET.used) == (files, held)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert leftovers(temp_dir) == []
    assert store.head(KEY) is None


class HashingStore:
    """A media store that only reads the uploaded file back in blocks (no server in-process)."""

    bucket = "fake"
    multipart_threshold = 64 * MiB
    retention = NO_LOCK

    def __init__(self) -> None:
        self.uploaded: tuple[int, str] | None = None

    def upload_file(
        self, key: str, path: Path, *, size: int, sha256_hex: str, confirmed_by: str | None = None
    ) -> str:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while block := handle.read(1 * MiB):
                digest.update(block)
        self.uploaded = (path.stat().st_size, digest.hexdigest())
        return "uploaded"

    def store_file(
        self,
        key: str,
        path: Path,
        *,
        size: int,
        sha256_hex: str,
        confirmed_by: str | None = None,
        retention: Retention = NO_RETENTION,
        archived_at: datetime | None = None,
    ) -> str:
        return self.upload_file(key, path, size=size, sha256_hex=sha256_hex)

    def verify_stored(
        self, key: str, *, size: int, sha256_hex: str, retention: Retention = NO_RETENTION
    ) -> None:
        assert self.uploaded == (size, sha256_hex)

    def put_bytes(self, key: str, data: bytes, *, retention: Retention = NO_RETENTION) -> None:
        pass


async def test_memory_is_bounded_by_chunks_not_file_size(temp_dir: Path) -> None:
    source = Mp3Source("big", 64 * MiB, with_id3=True)
    bird = FakeBird(FakeDownload(source.iter_chunks(256 * 1024), source.size))
    store = HashingStore()
    tracemalloc.start()
    try:
        result = await archive(bird, store, temp_dir)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.size_bytes == 64 * MiB
    assert store.uploaded == (64 * MiB, result.sha256)
    # Chunks, the sniff buffer and the write buffer: a few MiB, whatever the file size.
    assert peak < 6 * MiB, peak


# --- through the simulator and the real Bird client ------------------------------------------


async def test_archive_through_simulator_with_media_faults(
    simulator_factory: SimulatorFactory,
    bird_client_factory: BirdClientFactory,
    store: MediaStore,
    temp_dir: Path,
) -> None:
    simulator = simulator_factory(
        recordings=30, seed=11, faults="media", media_size_range=(20_000, 300_000)
    )
    bird = bird_client_factory(simulator)
    ids = simulator.dataset.available_ids()[:12]
    assert len(ids) >= 10
    results = await asyncio.gather(
        *(
            archive_media(
                bird,
                store,
                recording_id=rid,
                key=f"r/{rid}.mp3",
                sidecar=b"{}",
                temp_dir=temp_dir,
            )
            for rid in ids
        )
    )
    for rid, result in zip(ids, results, strict=True):
        expected = simulator.dataset.media_bytes(rid)
        assert result.sha256 == hashlib.sha256(expected).hexdigest()
        assert store.hash_object(f"r/{rid}.mp3") == (len(expected), result.sha256)
    assert simulator.leaks == []
    statuses = {record.status for record in simulator.media_requests()}
    assert statuses - {200}, "the media fault profile should have injected something"
    assert leftovers(temp_dir) == []


# --- crash leftovers and the pre-check -------------------------------------------------------


async def test_check_existing_skips_the_download_of_a_stored_object(
    store: MediaStore, temp_dir: Path
) -> None:
    data = mp3(40_000)
    first = await archive(FakeBird(good(data)), store, temp_dir)
    store.s3.delete_object(Bucket=store.bucket, Key=sidecar_key(KEY))  # killed before the sidecar
    bird = FakeBird(NotFoundError("must not be asked"))
    again = await archive(bird, store, temp_dir, check_existing=True)
    assert bird.opened == 0
    assert again.outcome == "already_present"
    assert (again.size_bytes, again.sha256) == (first.size_bytes, first.sha256)
    assert store.head(sidecar_key(KEY)) is not None
    assert leftovers(temp_dir) == []


async def test_check_existing_never_accepts_a_damaged_object(
    store: MediaStore, temp_dir: Path
) -> None:
    # A store that ignored the upload checksum kept other bytes behind intact metadata.
    data = mp3(40_000)
    first = await archive(FakeBird(good(data)), store, temp_dir)
    store.s3.put_object(
        Bucket=store.bucket, Key=KEY, Body=data[: len(data) // 2], Metadata={"sha256": first.sha256}
    )
    bird = FakeBird(NotFoundError("must not be asked"))
    with pytest.raises(MediaConflictError, match="do not match its sha256 metadata"):
        await archive(bird, store, temp_dir, check_existing=True)
    assert stored(store) == data[: len(data) // 2]  # left untouched for an operator


async def test_check_existing_downloads_when_nothing_is_stored(
    store: MediaStore, temp_dir: Path
) -> None:
    data = mp3(40_000)
    result = await archive(FakeBird(good(data)), store, temp_dir, check_existing=True)
    assert result.outcome == "uploaded"
    assert stored(store) == data


async def test_failed_read_back_fails_the_archive_even_with_the_sidecar_written(
    store: MediaStore, temp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def wrong(key: str, *, size: int, sha256_hex: str, retention: Retention) -> None:
        raise MediaIntegrityError("stored sha256 metadata differs")

    monkeypatch.setattr(store, "verify_stored", wrong)
    with pytest.raises(MediaIntegrityError):
        await archive(FakeBird(good(mp3(30_000))), store, temp_dir)
    assert leftovers(temp_dir) == []


async def test_temp_file_names_carry_host_and_pid(store: MediaStore, temp_dir: Path) -> None:
    seen: list[str] = []
    real = store.store_file

    def spy(key: str, path: Path, **found: Any) -> str:
        seen.append(path.name)
        return real(key, path, **found)

    store.store_file = spy  # type: ignore[method-assign,assignment]
    await archive(FakeBird(good(mp3(20_000))), store, temp_dir, memory_limit=0)
    assert len(seen) == 1 and seen[0].startswith(temp_prefix()) and seen[0].endswith(".mp3.part")
    assert remove_orphan_temp_files(temp_dir) == 0


# --- where the body waits: memory or a temp file ----------------------------------------------


class PlaceSpy:
    """Records which of the store's writes carried the media: from memory or from a file."""

    def __init__(self, store: MediaStore) -> None:
        self.calls: list[str] = []
        real_bytes, real_file = store.store_bytes, store.store_file

        def from_memory(key: str, data: bytes, **kwargs: Any) -> str:
            self.calls.append("memory")
            return real_bytes(key, data, **kwargs)

        def from_file(key: str, path: Path, **kwargs: Any) -> str:
            self.calls.append(f"file {path.stat().st_size}")
            return real_file(key, path, **kwargs)

        store.store_bytes = from_memory  # type: ignore[method-assign,assignment]
        store.store_file = from_file  # type: ignore[method-assign,assignment]


async def test_small_body_goes_up_from_memory_with_no_temp_file(
    store: MediaStore, temp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[str] = []
    real_mkstemp = tempfile.mkstemp

    def spy(*args: Any, **kwargs: Any) -> tuple[int, str]:
        made.append("temp file")
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    place = PlaceSpy(store)
    data = mp3(3000)
    result = await archive(FakeBird(good(data, chunk=1000)), store, temp_dir)
    assert (place.calls, made) == (["memory"], [])
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert store.hash_object(KEY) == (len(data), result.sha256)
    assert stored(store, sidecar_key(KEY)) == SIDECAR


async def test_announced_body_above_the_limit_goes_to_a_temp_file(
    store: MediaStore, temp_dir: Path
) -> None:
    place = PlaceSpy(store)
    data = mp3(300_000)
    await archive(FakeBird(good(data)), store, temp_dir, memory_limit=100_000)
    assert place.calls == [f"file {len(data)}"]
    assert stored(store) == data
    assert leftovers(temp_dir) == []


async def test_body_of_unknown_length_spills_to_a_file_when_it_grows_past_the_limit(
    store: MediaStore, temp_dir: Path
) -> None:
    place = PlaceSpy(store)
    data = mp3(300_000)
    pieces = [data[i : i + 40_000] for i in range(0, len(data), 40_000)]
    result = await archive(
        FakeBird(FakeDownload(pieces, None)), store, temp_dir, memory_limit=100_000
    )
    # What was in memory before the spill is in the file, in order, and in the hash.
    assert place.calls == [f"file {len(data)}"]
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert stored(store) == data
    assert leftovers(temp_dir) == []


async def test_bodies_beyond_the_memory_budget_go_to_temp_files(
    store: MediaStore, temp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Room for one body of 50 KB in memory: of two at once, the second goes to a file.
    monkeypatch.setattr(BUDGET, "capacity", 60_000)
    both = asyncio.Event()
    arrived = Counter[str]()
    data = [mp3(50_000, key="a"), mp3(50_000, key="b")]

    class Waiting(FakeDownload):
        async def iter_bytes(self) -> AsyncIterator[bytes]:
            async for chunk in super().iter_bytes():
                yield chunk
            # Neither body is finished before both were begun.
            arrived["n"] += 1
            if arrived["n"] == 2:
                both.set()
            await asyncio.wait_for(both.wait(), 5)

    place = PlaceSpy(store)
    results = await asyncio.gather(
        *(
            archive_media(
                FakeBird(Waiting([body], len(body))),
                store,
                recording_id=f"rec-{n}",
                key=f"{KEY}.{n}",
                sidecar=SIDECAR,
                temp_dir=temp_dir,
            )
            for n, body in enumerate(data)
        )
    )
    assert sorted(place.calls) == ["file 50000", "memory"]
    assert [r.sha256 for r in results] == [hashlib.sha256(body).hexdigest() for body in data]
    assert leftovers(temp_dir) == []
