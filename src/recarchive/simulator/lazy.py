"""A dataset drawn on demand: a million recordings without a million payloads in memory.

Recording ``index`` is drawn from an RNG of its own, ``random.Random(f"{seed}/{index}")`` (a
``str`` seed is hashed with SHA-512, so it is the same in every process, unlike ``hash()``),
with the field shapes of the eager :class:`~recarchive.simulator.dataset.Dataset`
(:func:`~recarchive.simulator.dataset.build_payload`). Its ID is computed, never stored: the
UUID's low 32 bits are the index xor a seed-derived mask, the upper 96 (less the v4 version and
variant bits) a keyed BLAKE2b of the index. An ID maps back to its index in O(1); the ID
regenerated from that index tells a real ID from a made-up one. The same digest decides, with
its last 32 bits, whether the ID is one of the missing ones.

Changes (tests, the demo, the ``notready`` fault) live in small overrides. The views that need
the whole dataset (:meth:`LazyDataset.available_ids`, :meth:`~LazyDataset.listing`,
:meth:`~LazyDataset.ids_created_between`, :meth:`~LazyDataset.make_all_available`) draw every
index again, each time. The IDs and payloads differ from the eager dataset's of the same seed
(another draw order), so the lazy mode is opt-in.
"""

from __future__ import annotations

import bisect
import hashlib
import random
import threading
from array import array
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any, overload

from recarchive.simulator.dataset import (
    build_payload,
    created_at,
    deep_copy,
    initial_status,
    iso,
    media_size,
    parse_iso,
    touch_payload,
)
from recarchive.simulator.mp3 import Mp3Source

#: Indexes live in the UUID's low 32 bits.
MAX_RECORDINGS = 2**32
_LOW = 0xFFFFFFFF


class IdSequence(Sequence[str]):
    """IDs computed from their positions: a sequence that holds no string.

    Args:
        length: How many IDs.
        index_at: The dataset index of a position (``0 <= position < length``).
        position_of: The position of an ID, or ``None`` when it is not in this sequence.
        id_of: The ID of a dataset index.
    """

    def __init__(
        self,
        length: int,
        index_at: Callable[[int], int],
        position_of: Callable[[str], int | None],
        id_of: Callable[[int], str],
    ) -> None:
        self._length = length
        self._index_at = index_at
        self._position_of = position_of
        self._id_of = id_of

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, position: int) -> str: ...
    @overload
    def __getitem__(self, position: slice) -> list[str]: ...
    def __getitem__(self, position: int | slice) -> str | list[str]:
        positions = range(self._length)
        if isinstance(position, slice):
            return [self._id_of(self._index_at(p)) for p in positions[position]]
        return self._id_of(self._index_at(positions[position]))  # range raises the IndexError

    def __iter__(self) -> Iterator[str]:
        for position in range(self._length):
            yield self._id_of(self._index_at(position))

    def __contains__(self, value: object) -> bool:
        return isinstance(value, str) and self._position_of(value) is not None

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        """The position of ``value`` (O(1), not a scan).

        Raises:
            ValueError: ``value`` is not in the sequence (between ``start`` and ``stop``).
        """
        found = self._position_of(value) if isinstance(value, str) else None
        window = range(self._length)[start:stop]
        if found is None or found not in window:
            raise ValueError(f"{value!r} is not in the sequence")
        return found

    def count(self, value: Any) -> int:
        """1 when ``value`` is in the sequence (IDs are unique), else 0."""
        return int(value in self)

    def __eq__(self, other: object) -> bool:
        # Like a list: equal to any sequence of the same IDs (a str is not one).
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # mutable-looking like a list: unhashable

    def __repr__(self) -> str:
        return f"<IdSequence of {self._length} IDs>"


class LazyDataset:
    """Recordings of one simulated workspace, each drawn when asked for.

    Args:
        recordings: Number of recordings (below 2**32).
        seed: Seed of every random choice.
        workspace_id: The workspace the recordings belong to.
        media_size_range: Smallest and largest media size in bytes (log-uniform in between).
        available_fraction: Share of recordings whose status is ``available``.
        missing_fraction: Share of IDs that answer 404 (in :attr:`all_ids` only). Their
            indexes are found once, here: a scan of every index (about 2 µs each) into a
            compact ``array('I')``; none when the fraction is 0.
        transcriptions: Whether payloads may say ``transcription: true``.
        held_back: Whether a recording drawn ``available`` is held back (the ``notready``
            fault): it says ``completed`` with ``updatedAt`` a minute on, as the eager
            server's ``set_status`` at start makes it, without a scan at start.

    Attributes:
        ids: IDs of the recordings that exist, in index order (computed, see
            :class:`IdSequence`).
        missing_ids: IDs the API answers 404 for.
        all_ids: Both, in index order: the IDs a user would have.

    Raises:
        ValueError: ``recordings`` is negative or does not fit in 32 bits.
    """

    def __init__(
        self,
        recordings: int,
        seed: int,
        *,
        workspace_id: str,
        media_size_range: tuple[int, int] = (4_000, 400_000),
        available_fraction: float = 0.8,
        missing_fraction: float = 0.0,
        transcriptions: bool = True,
        held_back: Callable[[str], bool] | None = None,
    ) -> None:
        if not 0 <= recordings < MAX_RECORDINGS:
            raise ValueError(f"a lazy dataset holds 0 to 2**32 - 1 recordings, not {recordings}")
        self.workspace_id = workspace_id
        self.seed = seed
        self.transcriptions = transcriptions
        self._recordings = recordings
        self._size_range = media_size_range
        self._available_fraction = available_fraction
        self._held_back = held_back
        self._key = hashlib.blake2b(f"recarchive-simulator:{seed}".encode()).digest()
        self._mask = int.from_bytes(hashlib.blake2b(b"mask", key=self._key).digest()[:4], "big")
        # Below this 32-bit draw an ID is missing; int() so that 1.0 means every ID.
        threshold = int(missing_fraction * 2**32)
        self._missing = array("I")
        if threshold:
            self._missing.extend(i for i in range(recordings) if self._missing_draw(i) < threshold)
        self._lock = threading.Lock()
        self._edited: dict[int, dict[str, Any]] = {}  # whole payloads of changed recordings
        self._made_available: set[int] = set()  # make_all_available(), without the payloads
        self._media_sizes: dict[int, int] = {}
        self._deleted: set[int] = set()
        missing = self._missing
        self.all_ids = IdSequence(
            recordings, lambda position: position, self._position_in_all, self._id
        )
        self.ids = IdSequence(
            recordings - len(missing), self._existing_at, self._position_in_ids, self._id
        )
        self.missing_ids = IdSequence(
            len(missing), missing.__getitem__, self._position_in_missing, self._id
        )

    # --- IDs and indexes -------------------------------------------------------------------

    def _digest(self, index: int) -> bytes:
        return hashlib.blake2b(index.to_bytes(4, "big"), key=self._key, digest_size=16).digest()

    def _missing_draw(self, index: int) -> int:
        return int.from_bytes(self._digest(index)[12:], "big")

    def _id(self, index: int) -> str:
        value = int.from_bytes(self._digest(index)[:12], "big") << 32 | (index ^ self._mask)
        # The v4 version nibble and RFC 4122 variant bits, as uuid.UUID(version=4) sets them.
        value = (value & ~(0xF000 << 64)) | (4 << 76)
        value = (value & ~(0xC000 << 48)) | (0x8000 << 48)
        text = f"{value:032x}"
        return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"

    def _index(self, recording_id: str) -> int | None:
        """The index of an ID of this dataset (missing ones too), else ``None``."""
        if len(recording_id) != 36:
            return None
        try:
            index = int(recording_id[-8:], 16) ^ self._mask
        except ValueError:
            return None
        if not 0 <= index < self._recordings or self._id(index) != recording_id:
            return None
        return index

    def _is_missing(self, index: int) -> bool:
        at = bisect.bisect_left(self._missing, index)
        return at < len(self._missing) and self._missing[at] == index

    def _existing(self, recording_id: str) -> int | None:
        index = self._index(recording_id)
        return None if index is None or self._is_missing(index) else index

    def _existing_at(self, position: int) -> int:
        # The index of the position-th existing ID: position plus the missing indexes before
        # it, i.e. those missing[j] with missing[j] - j (existing IDs before them) <= position.
        missing, low, high = self._missing, 0, len(self._missing)
        while low < high:
            middle = (low + high) // 2
            if missing[middle] - middle <= position:
                low = middle + 1
            else:
                high = middle
        return position + low

    def _position_in_all(self, recording_id: str) -> int | None:
        return self._index(recording_id)

    def _position_in_ids(self, recording_id: str) -> int | None:
        index = self._existing(recording_id)
        return None if index is None else index - bisect.bisect_left(self._missing, index)

    def _position_in_missing(self, recording_id: str) -> int | None:
        index = self._index(recording_id)
        if index is None or not self._is_missing(index):
            return None
        return bisect.bisect_left(self._missing, index)

    def _existing_indexes(self) -> Iterator[int]:
        previous = 0
        for missing in self._missing:
            yield from range(previous, missing)
            previous = missing + 1
        yield from range(previous, self._recordings)

    def _require(self, recording_id: str) -> int:
        index = self._existing(recording_id)
        if index is None:
            raise KeyError(recording_id)
        return index

    # --- drawing (callers hold the lock) ----------------------------------------------------

    def _draws(self, index: int) -> tuple[random.Random, bool, int]:
        """The recording's RNG after its cheap draws, whether it is available, its media size."""
        rng = random.Random(f"{self.seed}/{index}")
        available = rng.random() < self._available_fraction
        return rng, available, media_size(rng, *self._size_range)

    def _generated(self, index: int) -> dict[str, Any]:
        recording_id = self._id(index)
        rng, available, _ = self._draws(index)
        payload = build_payload(recording_id, index, rng, available)
        if not self.transcriptions:
            payload["transcription"] = False
        if available and self._held_back is not None and self._held_back(recording_id):
            payload["status"] = "completed"
            touch_payload(payload)
        if index in self._made_available:
            payload["status"] = "available"
            touch_payload(payload)
        return payload

    def _current(self, index: int) -> dict[str, Any]:
        edited = self._edited.get(index)
        return self._generated(index) if edited is None else deep_copy(edited)

    def _status(self, index: int) -> str:
        """The current status without drawing the whole payload."""
        edited = self._edited.get(index)
        if edited is not None:
            return str(edited["status"])
        if index in self._made_available:
            return "available"
        _, available, _ = self._draws(index)
        if available and self._held_back is not None and self._held_back(self._id(index)):
            return "completed"
        return initial_status(index, available)

    def _created(self, index: int) -> str:
        """The current ``createdAt`` (the payload's first draw) without the rest."""
        edited = self._edited.get(index)
        if edited is not None:
            return str(edited["createdAt"])
        return iso(created_at(self._draws(index)[0]))

    # --- reading ---------------------------------------------------------------------------

    def payload(self, recording_id: str) -> dict[str, Any] | None:
        """Return the current metadata of a recording, or ``None`` when it does not exist."""
        with self._lock:
            index = self._existing(recording_id)
            return None if index is None else self._current(index)

    def has_media(self, recording_id: str) -> bool:
        """True when the recording exists, is ``available`` and its media was not deleted."""
        with self._lock:
            index = self._existing(recording_id)
            return (
                index is not None
                and index not in self._deleted
                and self._status(index) == "available"
            )

    def media(self, recording_id: str) -> Mp3Source:
        """Return the media source of a recording (deterministic bytes).

        Raises:
            KeyError: The recording does not exist.
        """
        with self._lock:
            index = self._require(recording_id)
            size = self._media_sizes.get(index)
            if size is None:
                size = self._draws(index)[2]
        with_id3 = int(recording_id[-1], 16) % 2 == 0
        return Mp3Source(recording_id, size, with_id3=with_id3)

    def media_bytes(self, recording_id: str) -> bytes:
        """Return every media byte of a recording (tests; prefer :meth:`media` for big ones)."""
        return self.media(recording_id).read_all()

    def available_ids(self) -> list[str]:
        """IDs whose status is ``available``: draws every index (about 10 µs each)."""
        with self._lock:
            return [self._id(i) for i in self._existing_indexes() if self._status(i) == "available"]

    def ids_created_between(self, since: datetime, until: datetime) -> list[str]:
        """IDs with ``since <= createdAt < until``: draws every index (about 10 µs each)."""
        with self._lock:
            return [
                self._id(i)
                for i in self._existing_indexes()
                if since <= parse_iso(self._created(i)) < until
            ]

    def listing(self) -> Iterator[dict[str, Any]]:
        """Payloads in list-endpoint order (``createdAt`` ascending, then ID).

        Sorts a key of every recording first (about 15 µs and 200 bytes each), then draws
        each payload as the iterator reaches it (about 100 µs each).
        """
        with self._lock:
            order = sorted((self._created(i), self._id(i), i) for i in self._existing_indexes())
        for _, _, index in order:
            with self._lock:
                payload = self._current(index)
            yield payload

    # --- changing (tests and the demo) -----------------------------------------------------

    def make_all_available(self) -> int:
        """Turn every recording that is not ``available`` yet into one; return how many.

        Draws every index; a recording never changed otherwise costs one set entry.
        """
        with self._lock:
            changed = 0
            for index in self._existing_indexes():
                edited = self._edited.get(index)
                if edited is not None:
                    if edited["status"] != "available":
                        edited["status"] = "available"
                        touch_payload(edited)
                        changed += 1
                elif self._status(index) != "available":
                    self._made_available.add(index)
                    changed += 1
            return changed

    def _edit(self, recording_id: str, changes: dict[str, Any]) -> None:
        with self._lock:
            index = self._require(recording_id)
            payload = self._edited.get(index) or self._generated(index)
            payload.update(changes)
            touch_payload(payload)
            self._edited[index] = payload

    def set_status(self, recording_id: str, status: str) -> None:
        """Set one recording's status (its ``updatedAt`` moves on).

        Raises:
            KeyError: The recording does not exist.
        """
        self._edit(recording_id, {"status": status})

    def touch(self, recording_id: str, **changes: Any) -> None:
        """Change fields of a recording and move its ``updatedAt`` on.

        Raises:
            KeyError: The recording does not exist.
        """
        self._edit(recording_id, changes)

    def set_media_size(self, recording_id: str, size: int) -> None:
        """Give one recording media of exactly ``size`` bytes (benchmarks: a huge file).

        Raises:
            KeyError: The recording does not exist (overrides are kept by index).
        """
        with self._lock:
            self._media_sizes[self._require(recording_id)] = size

    def delete_media(self, recording_id: str) -> bool:
        """Delete a recording's media (the DELETE endpoint); False when it does not exist."""
        with self._lock:
            index = self._existing(recording_id)
            if index is None:
                return False
            self._deleted.add(index)
            return True

    def is_deleted(self, recording_id: str) -> bool:
        """True when the media was deleted through the DELETE endpoint."""
        with self._lock:
            index = self._existing(recording_id)
            return index is not None and index in self._deleted
