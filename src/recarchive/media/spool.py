"""Where a download's bytes wait for the upload: in memory when small, else in a temp file.

A small recording (at most :data:`MEMORY_BODY_BYTES`) is kept in memory: a temp file cost it a
``mkstemp``, an open, a write, a close, a second open for the upload and an unlink, each a
thread hop, for a body of a few kilobytes (bench/media_throughput.py, ``--size-kb 3``). Memory
stays bounded whatever the concurrency: the bodies in memory of the whole process share one
budget of :data:`MEMORY_BUDGET_BYTES`; a body that does not fit (announced too large, grown
past the limit, or no room left) goes to a temp file, named by
:func:`recarchive.tempfiles.temp_prefix` so the sweep of a killed run finds it, and streamed
there chunk by chunk as before.

The blocking work of the media path (hashing large chunks, file I/O, boto3 calls) runs on one
thread pool of the process (:func:`media_threads`), not on the event loop's default executor:
that one (``min(32, cpus + 4)`` threads, six on two cores) is shared with every other blocking
call of the run, and chunks waiting there behind S3 requests stalled the downloads. The pool
starts threads only as calls need them and keeps them: a thread started per recording cost
the event loop a wait for the new thread to take the GIL, for every recording.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from recarchive.tempfiles import MEDIA_SUFFIX, temp_prefix

T = TypeVar("T")

MiB = 1024 * 1024
#: Largest body kept in memory instead of a temp file.
MEMORY_BODY_BYTES = 4 * MiB
#: Bytes of bodies the whole process keeps in memory at once, whatever the concurrency.
MEMORY_BUDGET_BYTES = 64 * MiB
#: Chunks up to this size are hashed on the event loop: a thread hop costs more.
INLINE_HASH_BYTES = 64 * 1024
#: Threads of the media pool at most; they start only when calls wait for one.
MAX_THREADS = 256

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def media_threads() -> ThreadPoolExecutor:
    """The media path's thread pool of this process (started at first use)."""
    global _pool  # one pool per process, made at first use, never at import
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=MAX_THREADS, thread_name_prefix="recarchive-media"
            )
        return _pool


def _forget_pool() -> None:
    # A forked child has none of the parent's threads: it starts its own pool.
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool)


async def in_thread(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run ``func`` on the media pool and return its result."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(media_threads(), functools.partial(func, *args, **kwargs))


class _Budget:
    """Bytes of bodies in memory in this process; taken and given back by :class:`BodySpool`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._lock = threading.Lock()  # event loops of several threads may share the process

    def take(self, size: int) -> bool:
        with self._lock:
            if self.used + size > self.capacity:
                return False
            self.used += size
            return True

    def give(self, size: int) -> None:
        with self._lock:
            self.used -= size


BUDGET = _Budget(MEMORY_BUDGET_BYTES)


def _write_and_hash(handle: BinaryIO, digest: Any, chunk: bytes) -> None:
    # Both release the GIL for large buffers, so this runs beside the event loop.
    digest.update(chunk)
    handle.write(chunk)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # noqa: PTH108


class BodySpool:
    """One recording's body while it downloads: hashed, kept in memory or in a temp file.

    Args:
        temp_dir: Folder of the temp file (system default when ``None``).
        memory_limit: Largest body kept in memory (``0``: always a temp file).
        budget: The process's memory budget of bodies.
    """

    def __init__(
        self,
        temp_dir: Path | None,
        *,
        memory_limit: int = MEMORY_BODY_BYTES,
        budget: _Budget = BUDGET,
    ) -> None:
        self._temp_dir = temp_dir
        self._limit = memory_limit
        self._budget = budget
        self._taken = 0
        self._memory: bytearray | None = None
        self._handle: BinaryIO | None = None
        self.path: Path | None = None
        self.size = 0
        self._digest = hashlib.sha256()

    @property
    def data(self) -> bytearray | None:
        """The body when it is in memory (after :meth:`finish`), else ``None``."""
        return self._memory

    def sha256(self) -> str:
        """Hex SHA-256 of the bytes written since the last :meth:`start`."""
        return self._digest.hexdigest()

    async def start(self, announced: int | None) -> None:
        """Begin a (fresh) download of ``announced`` bytes (``None``: unknown); drop any before."""
        self.size = 0
        self._digest = hashlib.sha256()
        self._memory = None
        if self._handle is not None:  # an earlier attempt broke off mid-body
            handle, self._handle = self._handle, None
            await in_thread(handle.close)
        if announced is not None and announced <= self._limit and self._reserve(announced):
            self._memory = bytearray()
            return
        if announced is None and self._limit > 0:
            self._memory = bytearray()  # grows under the budget, spills to a file past it
            return
        self._give_back()
        await self._open_file()

    async def write(self, chunk: bytes) -> None:
        """Add ``chunk`` to the body and its hash."""
        self.size += len(chunk)
        if self._memory is not None:
            if self.size > self._taken and not (
                self.size <= self._limit and self._reserve(self.size)
            ):
                await self._spill()
            else:
                if len(chunk) <= INLINE_HASH_BYTES:
                    self._digest.update(chunk)
                else:
                    # Most of a millisecond per MiB: the loop has other downloads to serve.
                    await in_thread(self._digest.update, chunk)
                self._memory += chunk
                return
        assert self._handle is not None
        await in_thread(_write_and_hash, self._handle, self._digest, chunk)

    def _reserve(self, size: int) -> bool:
        """Hold ``size`` bytes of the budget in all (more than held already)."""
        if size <= self._taken:
            return True
        if not self._budget.take(size - self._taken):
            return False
        self._taken = size
        return True

    def _give_back(self) -> None:
        if self._taken:
            self._budget.give(self._taken)
            self._taken = 0

    async def _open_file(self) -> None:
        if self.path is None:
            # On the loop, not in a thread: a cancellation while a thread made the file
            # would leave it behind, unknown to close(), in a process that is still alive.
            handle, name = tempfile.mkstemp(
                prefix=temp_prefix(), suffix=MEDIA_SUFFIX, dir=self._temp_dir
            )
            self.path = Path(name)
            self._handle = os.fdopen(handle, "wb")
            return
        self._handle = await in_thread(self.path.open, "wb")

    async def _spill(self) -> None:
        """Move the bytes held in memory (hashed already) into a temp file."""
        held, self._memory = self._memory, None
        self._give_back()
        await self._open_file()
        assert self._handle is not None and held is not None
        if held:
            await in_thread(self._handle.write, held)  # already hashed

    async def finish(self) -> None:
        """The body is whole: close the temp file (its bytes are on disk for the upload)."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            await in_thread(handle.close)

    async def close(self) -> None:
        """Drop the body: give its memory back, close and remove the temp file.

        Shielded, and done synchronously when the task is cancelled meanwhile, so the file
        never outlives the transfer.
        """
        self._memory = None
        self._give_back()
        handle, self._handle = self._handle, None
        path, self.path = self.path, None
        if handle is None and path is None:
            return
        try:
            await asyncio.shield(in_thread(_close_and_remove, handle, path))
        except asyncio.CancelledError:
            _close_and_remove(handle, path)
            raise


def _close_and_remove(handle: BinaryIO | None, path: Path | None) -> None:
    # Unlinking a freshly written file costs milliseconds (the file system frees its pages):
    # a thread keeps that off the loop. A close after a cancelled write waits for the write
    # (buffered files lock), so the unlink comes last.
    if handle is not None:
        with contextlib.suppress(OSError):
            handle.close()
    if path is not None:
        _remove(path)
