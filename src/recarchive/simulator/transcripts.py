"""The simulator's transcriptions: Bird's Transcriptions API over the seeded dataset.

Every recording whose payload says ``transcription: true`` has one or two transcriptions,
drawn from the seed and the recording's ID (so the recordings' own draws do not move): most
``available``, some ``accepted`` (not ready; :meth:`TranscriptionStore.make_ready` or the
``transcription_ready_seconds`` setting turns them ``available``), a few ``failed``. Some
available ones offer no ``.txt``. Content bytes are deterministic.

Endpoints (docs.bird.com, "Transcriptions API"; see :mod:`recarchive.bird.transcriptions` for
what the client assumes of them):

* ``GET  /workspaces/{ws}/recordings/{recordingId}/transcriptions``: that recording's, as a list
  (``results``, ``nextPageToken``; ``limit`` 1..99);
* ``POST`` to the same path: creates one (``202``, status ``accepted``); recorded in
  :attr:`TranscriptionStore.created` so tests can show recarchive never calls it;
* ``GET  /workspaces/{ws}/transcriptions``: the workspace's, as a list;
* ``GET  /workspaces/{ws}/transcriptions/{id}``: one's metadata; with ``.json``, ``.srt``,
  ``.vtt`` or ``.txt``: its content.

Same key check, rate limit, request log and per-request faults as the recordings endpoints
(the API host's middleware and :meth:`~recarchive.simulator.api_host.ApiHost.request_faults`).
Tests misbehave on purpose through :attr:`TranscriptionStore.raw_lists` (a raw body answered
for a recording's list), :attr:`~TranscriptionStore.fail_next` (5xx answers before the good
one, per path) and :meth:`~TranscriptionStore.set_content`.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web

from recarchive.simulator.api_host import _decode_token, _encode_token, _error, _is_uuid, _json
from recarchive.simulator.dataset import RecordingSet, iso

#: Content formats Bird offers, and their content types.
FORMATS = {
    "json": "application/json",
    "srt": "application/x-subrip",
    "vtt": "text/vtt",
    "txt": "text/plain; charset=utf-8",
}
_WORDS = ("hello", "thanks", "for", "calling", "the", "order", "is", "ready", "yes", "no", "ok")

Faults = Callable[[web.Request, str], Awaitable[web.StreamResponse | None]]


@dataclass(frozen=True)
class SimTranscription:
    """One simulated transcription.

    Attributes:
        id: Its UUID.
        recording_id: The recording it transcribes.
        status: ``available``, ``accepted`` or ``failed``.
        locale: e.g. ``en-US``.
        stereo: One channel per party.
        created_at: ``createdAt`` (Bird's format).
        has_txt: Whether ``.txt`` is offered (404 otherwise).
    """

    id: str
    recording_id: str
    status: str
    locale: str
    stereo: bool
    created_at: str
    has_txt: bool = True

    def document(self) -> dict[str, Any]:
        """The ``Transcription`` object the API answers."""
        body: dict[str, Any] = {
            "id": self.id,
            "recordingId": self.recording_id,
            "status": self.status,
            "stereo": self.stereo,
            "locale": self.locale,
            "createdAt": self.created_at,
            "updatedAt": self.created_at,
        }
        if self.status == "available":
            # A presigned link, like the recordings' media URL: a credential, never stored.
            body["url"] = (
                f"https://media.api.bird.com/transcriptions/{self.id}.json"
                f"?X-Amz-Signature={uuid.UUID(self.id).hex[:16]}&X-Amz-Expires=300"
            )
            body["summary"] = "A short call."
        return body


class TranscriptionStore:
    """The transcriptions of one dataset, and the test hooks that make them misbehave.

    Args:
        dataset: The recordings.
        seed: The dataset's seed.
        ready_seconds: ``accepted`` transcriptions count as ``available`` this long after the
            store was made (``None``: only :meth:`make_ready` turns them).

    Attributes:
        created: ``(recordingId, body)`` of every POST received (recarchive must send none).
        raw_lists: Recording ID -> raw JSON body answered for its list instead of the real one.
        fail_next: Request path -> how many 503 answers come before the real one.
    """

    def __init__(
        self, dataset: RecordingSet, seed: int, ready_seconds: float | None = None
    ) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, SimTranscription] = {}
        self._by_recording: dict[str, list[str]] = {}
        self._content: dict[tuple[str, str], bytes] = {}
        self._ready_at = None if ready_seconds is None else time.monotonic() + ready_seconds
        self.created: list[tuple[str, Any]] = []
        self.raw_lists: dict[str, bytes] = {}
        self.fail_next: Counter[str] = Counter()
        # Without transcriptions no payload says true: skip the scan (a lazy million would
        # draw every payload here, at start).
        for recording_id in dataset.ids if dataset.transcriptions else ():
            payload = dataset.payload(recording_id)
            if payload is None or not payload.get("transcription"):
                continue
            rng = random.Random(f"{seed}:transcriptions:{recording_id}")
            created = datetime.fromisoformat(payload["createdAt"].replace("Z", "+00:00"))
            for number in range(1 + (rng.random() < 0.3)):
                draw = rng.random()
                status = "available" if draw < 0.72 else "accepted" if draw < 0.9 else "failed"
                item = SimTranscription(
                    id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                    recording_id=recording_id,
                    status=status,
                    locale=rng.choice(["en-US", "nl-NL", "de-DE"]),
                    stereo=bool(payload.get("stereo")),
                    created_at=iso(created + timedelta(minutes=5 + number)),
                    has_txt=rng.random() < 0.8,
                )
                self._add(item)

    def _add(self, item: SimTranscription) -> None:
        self._by_id[item.id] = item
        self._by_recording.setdefault(item.recording_id, []).append(item.id)

    def _current(self, item: SimTranscription) -> SimTranscription:
        ready_at = self._ready_at
        if item.status == "accepted" and ready_at is not None and time.monotonic() >= ready_at:
            return replace(item, status="available")
        return item

    # --- reading ---------------------------------------------------------------------------

    def for_recording(self, recording_id: str) -> list[SimTranscription]:
        """A recording's transcriptions, oldest first."""
        with self._lock:
            ids = self._by_recording.get(recording_id, [])
            return [self._current(self._by_id[tid]) for tid in ids]

    def get(self, transcription_id: str) -> SimTranscription | None:
        """One transcription, or ``None``."""
        with self._lock:
            item = self._by_id.get(transcription_id)
            return None if item is None else self._current(item)

    def all(self) -> list[SimTranscription]:
        """Every transcription of the workspace, by creation time then ID."""
        with self._lock:
            items = [self._current(item) for item in self._by_id.values()]
        return sorted(items, key=lambda item: (item.created_at, item.id))

    def content(self, transcription_id: str, fmt: str) -> bytes | None:
        """The bytes of one format; ``None`` when not offered (not ready, or no ``.txt``)."""
        item = self.get(transcription_id)
        if item is None or item.status != "available" or fmt not in FORMATS:
            return None
        if fmt == "txt" and not item.has_txt:
            return None
        with self._lock:
            override = self._content.get((transcription_id, fmt))
        return override if override is not None else _render(item, fmt)

    # --- changing (tests) -------------------------------------------------------------------

    def make_ready(self, recording_id: str | None = None) -> int:
        """Turn ``accepted`` transcriptions (of one recording, or all) ``available``."""
        with self._lock:
            changed = 0
            for tid, item in list(self._by_id.items()):
                if item.status == "accepted" and recording_id in (None, item.recording_id):
                    self._by_id[tid] = replace(item, status="available")
                    changed += 1
            return changed

    def set_status(self, transcription_id: str, status: str) -> None:
        """Give one transcription another status."""
        with self._lock:
            self._by_id[transcription_id] = replace(self._by_id[transcription_id], status=status)

    def set_offers_txt(self, transcription_id: str, offered: bool) -> None:
        """Offer (or stop offering) one transcription's ``.txt``."""
        with self._lock:
            item = self._by_id[transcription_id]
            self._by_id[transcription_id] = replace(item, has_txt=offered)

    def set_content(self, transcription_id: str, fmt: str, data: bytes) -> None:
        """Answer ``data`` for one format of one transcription from now on."""
        with self._lock:
            self._content[(transcription_id, fmt)] = data

    def create(self, recording_id: str, body: Any) -> SimTranscription:
        """The POST: a new ``accepted`` transcription (recorded in :attr:`created`)."""
        locale = body.get("locale") if isinstance(body, dict) else None
        item = SimTranscription(
            id=str(uuid.uuid4()),
            recording_id=recording_id,
            status="accepted",
            locale=locale if isinstance(locale, str) else "en-US",
            stereo=False,
            created_at=iso(datetime.now().astimezone()),
        )
        with self._lock:
            self.created.append((recording_id, body))
            self._add(item)
        return item


def _render(item: SimTranscription, fmt: str) -> bytes:
    """Deterministic content of one format, from the transcription's ID."""
    rng = random.Random(f"content:{item.id}")
    segments: list[dict[str, Any]] = []
    start = 0.0
    for index in range(3 + rng.randrange(12)):
        length = round(rng.uniform(0.5, 6.0), 2)
        text = " ".join(rng.choice(_WORDS) for _ in range(2 + rng.randrange(10)))
        segments.append({"channel": index % 2, "start": start, "end": start + length, "text": text})
        start = round(start + length + 0.2, 2)
    if fmt == "json":
        document = {"id": item.id, "recordingId": item.recording_id, "locale": item.locale}
        return json.dumps({**document, "segments": segments}, indent=1).encode()
    if fmt == "txt":
        return "".join(f"{segment['text']}\n" for segment in segments).encode()
    lines = ["WEBVTT", ""] if fmt == "vtt" else []
    for number, segment in enumerate(segments, 1):
        lines += [str(number), f"{_stamp(segment['start'])} --> {_stamp(segment['end'])}"]
        lines += [str(segment["text"]), ""]
    return "\n".join(lines).encode()


def _stamp(seconds: Any) -> str:
    whole, millis = int(seconds), int(seconds % 1 * 1000)
    return f"{whole // 3600:02d}:{whole // 60 % 60:02d}:{whole % 60:02d},{millis:03d}"


class TranscriptionHost:
    """The transcription routes of the API host.

    Args:
        workspace_id: The workspace served.
        store: The transcriptions.
        faults: The API host's per-request faults.
        has_recording: Whether a recording ID exists (404 otherwise).
    """

    def __init__(
        self,
        workspace_id: str,
        store: TranscriptionStore,
        faults: Faults,
        has_recording: Callable[[str], bool],
    ) -> None:
        self._workspace_id = workspace_id
        self._store = store
        self._faults = faults
        self._has_recording = has_recording

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Add the transcription routes to ``router``."""
        ws = "/workspaces/{workspace}"
        router.add_get(ws + "/recordings/{recording}/transcriptions", self._list_recording)
        router.add_post(ws + "/recordings/{recording}/transcriptions", self._create)
        router.add_get(ws + "/transcriptions", self._list_workspace)
        router.add_get(ws + "/transcriptions/{transcription}", self._get)

    async def _before(self, request: web.Request, key: str) -> web.StreamResponse | None:
        if request.match_info["workspace"] != self._workspace_id:
            return _error(404, "NotFound", "workspace not found")
        fault = await self._faults(request, key)
        if fault is not None:
            return fault
        if self._store.fail_next[request.path] > 0:
            self._store.fail_next[request.path] -= 1
            return _error(503, "Unavailable", "simulated outage")
        return None

    async def _list_recording(self, request: web.Request) -> web.StreamResponse:
        recording_id = request.match_info["recording"]
        early = await self._before(request, f"tlist:{recording_id}")
        if early is not None:
            return early
        if not _is_uuid(recording_id):
            return _error(422, "InvalidParameter", "recordingId must be a UUID")
        if not self._has_recording(recording_id):
            return _error(404, "NotFound", "recording not found")
        raw = self._store.raw_lists.get(recording_id)
        if raw is not None:
            return web.Response(body=raw, content_type="application/json")
        return _page(request, self._store.for_recording(recording_id))

    async def _list_workspace(self, request: web.Request) -> web.StreamResponse:
        early = await self._before(request, f"tall:{request.query.get('pageToken', '')}")
        return early or _page(request, self._store.all())

    async def _create(self, request: web.Request) -> web.StreamResponse:
        recording_id = request.match_info["recording"]
        early = await self._before(request, f"tcreate:{recording_id}")
        if early is not None:
            return early
        if not self._has_recording(recording_id):
            return _error(404, "NotFound", "recording not found")
        try:
            body = await request.json()
        except ValueError:
            body = None
        return _json(self._store.create(recording_id, body).document(), 202)

    async def _get(self, request: web.Request) -> web.StreamResponse:
        raw = request.match_info["transcription"]
        transcription_id, dot, fmt = raw.partition(".")
        early = await self._before(request, f"tget:{raw}")
        if early is not None:
            return early
        if not _is_uuid(transcription_id) or (dot and fmt not in FORMATS):
            return _error(422, "InvalidParameter", "not a transcription ID and format")
        item = self._store.get(transcription_id)
        if item is None:
            return _error(404, "NotFound", "transcription not found")
        if not dot:
            return _json(item.document())
        data = self._store.content(transcription_id, fmt)
        if data is None:
            return _error(404, "NotFound", f"no {fmt} content for this transcription")
        return web.Response(body=data, headers={"Content-Type": FORMATS[fmt]})


def _page(request: web.Request, items: list[SimTranscription]) -> web.StreamResponse:
    try:
        limit = int(request.query.get("limit", "20"))
        offset = _decode_token(request.query.get("pageToken"))
    except ValueError as exc:
        return _error(422, "InvalidParameter", str(exc))
    if not 1 <= limit <= 99:
        return _error(422, "InvalidParameter", "limit must be between 1 and 99")
    body: dict[str, Any] = {"results": [item.document() for item in items[offset : offset + limit]]}
    if offset + limit < len(items):
        body["nextPageToken"] = _encode_token(offset + limit)
    return _json(body)
