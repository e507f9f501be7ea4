"""The simulator's deterministic dataset: recording payloads and their media, from a seed.

Every field shape of the seed document occurs: optional fields missing or null, ``endedAt`` as
the zero date, anonymous numbers, conference recordings, unknown extra fields, every status
value, and ``createdAt`` spread over several months. The same seed always gives the same IDs,
payloads and media bytes.

:class:`Dataset` draws every recording up front from one sequential RNG (what the tests'
IDs and request counts rely on); :class:`~recarchive.simulator.lazy.LazyDataset` draws each
one on demand (a million recordings without the memory). Both are a :class:`RecordingSet`.
"""

from __future__ import annotations

import math
import random
import threading
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from recarchive.simulator.mp3 import Mp3Source

STATUSES = ("accepted", "ongoing", "paused", "completed", "available")
ZERO_DATE = "0001-01-01T00:00:00Z"
#: createdAt values are spread over this many days from :data:`EPOCH`.
SPREAD_DAYS = 180
EPOCH = datetime(2025, 3, 1, tzinfo=UTC)


def iso(moment: datetime) -> str:
    """Format a UTC datetime the way Bird does: milliseconds and a ``Z``."""
    return (
        moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    )


class RecordingSet(Protocol):
    """What the simulator's hosts read and tests change: a :class:`Dataset` or a lazy one."""

    @property
    def workspace_id(self) -> str:
        """The workspace the recordings belong to."""

    @property
    def seed(self) -> int:
        """Seed of every random choice."""

    @property
    def transcriptions(self) -> bool:
        """Whether payloads may say ``transcription: true`` (``False``: none does)."""

    @property
    def ids(self) -> Sequence[str]:
        """IDs of the recordings that exist, in the order they were drawn."""

    @property
    def missing_ids(self) -> Sequence[str]:
        """IDs drawn like the others that the API answers 404 for."""

    @property
    def all_ids(self) -> Sequence[str]:
        """Both, in the order they were drawn: the IDs a user would have."""

    def payload(self, recording_id: str) -> dict[str, Any] | None:
        """Return the current metadata of a recording, or ``None`` when it does not exist."""

    def has_media(self, recording_id: str) -> bool:
        """True when the recording exists, is ``available`` and its media was not deleted."""

    def media(self, recording_id: str) -> Mp3Source:
        """Return the media source of a recording (deterministic bytes)."""

    def media_bytes(self, recording_id: str) -> bytes:
        """Return every media byte of a recording."""

    def available_ids(self) -> list[str]:
        """IDs whose status is ``available``."""

    def ids_created_between(self, since: datetime, until: datetime) -> list[str]:
        """IDs with ``since <= createdAt < until``."""

    def listing(self) -> Iterator[dict[str, Any]]:
        """Payloads in list-endpoint order (``createdAt`` ascending, then ID)."""

    def make_all_available(self) -> int:
        """Turn every recording that is not ``available`` yet into one; return how many."""

    def set_status(self, recording_id: str, status: str) -> None:
        """Set one recording's status (its ``updatedAt`` moves on)."""

    def touch(self, recording_id: str, **changes: Any) -> None:
        """Change fields of a recording and move its ``updatedAt`` on."""

    def set_media_size(self, recording_id: str, size: int) -> None:
        """Give one recording media of exactly ``size`` bytes."""

    def delete_media(self, recording_id: str) -> bool:
        """Delete a recording's media; False when it does not exist."""

    def is_deleted(self, recording_id: str) -> bool:
        """True when the media was deleted through the DELETE endpoint."""


class Dataset:
    """Recordings of one simulated workspace.

    Args:
        recordings: Number of recordings.
        seed: Seed of every random choice.
        workspace_id: The workspace the recordings belong to.
        media_size_range: Smallest and largest media size in bytes (log-uniform in between).
        available_fraction: Share of recordings whose status is ``available``; the rest take
            the other status values in turn (media not ready yet).
        missing_fraction: Share of IDs that answer 404 (in :attr:`all_ids` only).
        transcriptions: Whether payloads may say ``transcription: true`` (about 30 % do);
            ``False``: every one says ``false``, the rest of the data unchanged.

    Attributes:
        transcriptions: The ``transcriptions`` argument.
        ids: IDs of the recordings that exist, in the order they were drawn.
        missing_ids: IDs drawn like the others that the API answers 404 for.
        all_ids: Both, in the order they were drawn: the IDs a user would have.
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
    ) -> None:
        self.workspace_id = workspace_id
        self.seed = seed
        self.transcriptions = transcriptions
        rng = random.Random(seed)
        self._lock = threading.Lock()
        self._payloads: dict[str, dict[str, Any]] = {}
        self._media_sizes: dict[str, int] = {}
        self._deleted: set[str] = set()
        self.missing_ids: list[str] = []
        self.ids: list[str] = []
        self.all_ids: list[str] = []
        low, high = media_size_range
        for index in range(recordings):
            recording_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            self.all_ids.append(recording_id)
            if rng.random() < missing_fraction:
                self.missing_ids.append(recording_id)
                continue
            self.ids.append(recording_id)
            available = rng.random() < available_fraction
            self._payloads[recording_id] = build_payload(recording_id, index, rng, available)
            if not transcriptions:
                self._payloads[recording_id]["transcription"] = False
            self._media_sizes[recording_id] = media_size(rng, low, high)

    # --- reading ---------------------------------------------------------------------------

    def payload(self, recording_id: str) -> dict[str, Any] | None:
        """Return the current metadata of a recording, or ``None`` when it does not exist."""
        with self._lock:
            payload = self._payloads.get(recording_id)
            return None if payload is None else deep_copy(payload)

    def has_media(self, recording_id: str) -> bool:
        """True when the recording exists, is ``available`` and its media was not deleted."""
        with self._lock:
            payload = self._payloads.get(recording_id)
            return (
                payload is not None
                and payload["status"] == "available"
                and recording_id not in self._deleted
            )

    def media(self, recording_id: str) -> Mp3Source:
        """Return the media source of a recording (deterministic bytes)."""
        size = self._media_sizes[recording_id]
        with_id3 = int(recording_id[-1], 16) % 2 == 0
        return Mp3Source(recording_id, size, with_id3=with_id3)

    def media_bytes(self, recording_id: str) -> bytes:
        """Return every media byte of a recording (tests; prefer :meth:`media` for big ones)."""
        return self.media(recording_id).read_all()

    def available_ids(self) -> list[str]:
        """IDs whose status is ``available``."""
        with self._lock:
            return [rid for rid, p in self._payloads.items() if p["status"] == "available"]

    def ids_created_between(self, since: datetime, until: datetime) -> list[str]:
        """IDs with ``since <= createdAt < until`` (the list endpoint's window)."""
        with self._lock:
            return [
                rid
                for rid, payload in self._payloads.items()
                if since <= parse_iso(payload["createdAt"]) < until
            ]

    def listing(self) -> Iterator[dict[str, Any]]:
        """Payloads in list-endpoint order (``createdAt`` ascending, then ID)."""
        with self._lock:
            ordered = sorted(self._payloads.values(), key=lambda p: (p["createdAt"], p["id"]))
            return iter([deep_copy(p) for p in ordered])

    # --- changing (tests and the demo) -----------------------------------------------------

    def make_all_available(self) -> int:
        """Turn every recording that is not ``available`` yet into one; return how many."""
        with self._lock:
            changed = 0
            for payload in self._payloads.values():
                if payload["status"] != "available":
                    payload["status"] = "available"
                    touch_payload(payload)
                    changed += 1
            return changed

    def set_status(self, recording_id: str, status: str) -> None:
        """Set one recording's status (its ``updatedAt`` moves on)."""
        with self._lock:
            payload = self._payloads[recording_id]
            payload["status"] = status
            touch_payload(payload)

    def touch(self, recording_id: str, **changes: Any) -> None:
        """Change fields of a recording and move its ``updatedAt`` on."""
        with self._lock:
            payload = self._payloads[recording_id]
            payload.update(changes)
            touch_payload(payload)

    def set_media_size(self, recording_id: str, size: int) -> None:
        """Give one recording media of exactly ``size`` bytes (benchmarks: a huge file)."""
        with self._lock:
            self._media_sizes[recording_id] = size

    def delete_media(self, recording_id: str) -> bool:
        """Delete a recording's media (the DELETE endpoint); False when it does not exist."""
        with self._lock:
            if recording_id not in self._payloads:
                return False
            self._deleted.add(recording_id)
            return True

    def is_deleted(self, recording_id: str) -> bool:
        """True when the media was deleted through the DELETE endpoint."""
        with self._lock:
            return recording_id in self._deleted


def media_size(rng: random.Random, low: int, high: int) -> int:
    """Draw a media size in bytes, log-uniform between ``low`` and ``high``."""
    return int(math.exp(rng.uniform(math.log(low), math.log(max(high, low + 1)))))


def created_at(rng: random.Random) -> datetime:
    """Draw a ``createdAt`` (the first draw of a payload), whole milliseconds."""
    created = EPOCH + timedelta(seconds=rng.uniform(0, SPREAD_DAYS * 86400))
    return created.replace(microsecond=(created.microsecond // 1000) * 1000)


def initial_status(index: int, available: bool) -> str:
    """The status recording ``index`` is drawn with (every value occurs, one never seen)."""
    if available:
        return "available"
    if index % 8 == 6:
        return "transcribing"  # a status value we have never seen
    return STATUSES[index % (len(STATUSES) - 1)]


def parse_iso(value: str) -> datetime:
    """Parse a timestamp in Bird's format (a ``Z`` for UTC)."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def touch_payload(payload: dict[str, Any]) -> None:
    """Move a payload's ``updatedAt`` on by a minute (what every change does)."""
    updated = parse_iso(payload["updatedAt"]) + timedelta(minutes=1)
    payload["updatedAt"] = iso(updated)


def deep_copy(value: Any) -> Any:
    """Copy nested dicts and lists (payloads handed out must not alias the stored ones)."""
    if isinstance(value, dict):
        return {key: deep_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [deep_copy(item) for item in value]
    return value


def _number(rng: random.Random, index: int) -> dict[str, Any] | None:
    shape = index % 6
    if shape == 5:
        return None
    if shape == 4:
        # An anonymous caller: no number, no name.
        return {
            "type": "pstn",
            "number": None,
            "anonymous": True,
            "callerIdName": None,
            "identity": None,
            "countryIsoCode": None,
        }
    digits = "".join(rng.choice("0123456789") for _ in range(9))
    country = rng.choice(["NL", "US", "GB", "DE", "BR"])
    number: dict[str, Any] = {
        "type": rng.choice(["pstn", "sip", "webrtc"]),
        "number": f"+31{digits}",
        "anonymous": False,
        "callerIdName": rng.choice(["Alice", "Bob", None]),
        "identity": f"sip:{digits}@example.com" if shape == 2 else None,
        "countryIsoCode": country,
    }
    if shape == 3:
        del number["identity"]  # optional field absent rather than null
    return number


def _party(rng: random.Random, index: int) -> dict[str, Any] | None:
    if index % 9 == 8:
        return None
    party: dict[str, Any] = {"number": _number(rng, index)}
    if index % 4 != 3:
        party["contact"] = {
            "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "identifierKey": "phonenumber",
            "identifierValue": f"+31{rng.randrange(10**8, 10**9)}",
        }
    return party


def build_payload(
    recording_id: str, index: int, rng: random.Random, available: bool
) -> dict[str, Any]:
    """Draw recording ``index``'s payload from ``rng`` (its shape follows from ``index``)."""
    created = created_at(rng)
    duration = rng.randrange(1, 3600)
    started = created + timedelta(seconds=rng.uniform(0, 5))
    conference = index % 10 == 7
    status = initial_status(index, available)
    payload: dict[str, Any] = {
        "id": recording_id,
        "source": "conference" if conference else "call",
        "sourceId": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "channelId": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "status": status,
        "direction": rng.choice(["incoming", "outgoing"]),
        "originator": _party(rng, index),
        "receiver": _party(rng, index + 3),
        "origin": rng.choice(["call-command-record", "flow-record", "conference-record"]),
        "duration": duration,
        "stereo": rng.random() < 0.5,
        "format": "mp3",
        "transcription": rng.random() < 0.3,
        "conferenceId": str(uuid.UUID(int=rng.getrandbits(128), version=4)) if conference else None,
        "url": (
            f"https://media.api.bird.com/recordings/{recording_id}.mp3"
            f"?X-Amz-Signature={rng.getrandbits(64):016x}&X-Amz-Expires=300"
        ),
        "roomInfoUrl": f"https://api.bird.com/rooms/{rng.getrandbits(32):08x}?token=secret",
        "createdAt": iso(created),
        "updatedAt": iso(created + timedelta(seconds=duration + 30)),
        "endedAt": iso(started + timedelta(seconds=duration)),
        "startedAt": iso(started),
    }
    shape = index % 8
    if shape == 1:
        payload["endedAt"] = ZERO_DATE
    elif shape == 2:
        for field in ("channelId", "direction", "duration", "roomInfoUrl", "endedAt"):
            del payload[field]
    elif shape == 3:
        for field in ("channelId", "direction", "duration", "url", "startedAt", "conferenceId"):
            payload[field] = None
    elif shape == 5:
        # Fields Bird may add later: kept in raw_json, never a failure.
        payload["sentiment"] = {"score": round(rng.uniform(-1, 1), 3), "model": "v2"}
        payload["tags"] = ["sales", "priority"]
    return payload
