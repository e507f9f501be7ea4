"""Bird's Transcriptions API, read only: a recording's transcriptions, and their content.

Every request goes through :meth:`BirdClient.send <recarchive.bird.client.BirdClient.send>`:
the same pacing, retry loop, status table and answer limits as the recordings' requests.
recarchive never asks Bird to *create* a transcription (``POST
/workspaces/{ws}/recordings/{id}/transcriptions``): this module has no call that could.

What docs.bird.com ("Transcriptions API") documents: ``GET /workspaces/{ws}/transcriptions``
(the whole workspace's, paged by ``pageToken``), ``GET /workspaces/{ws}/transcriptions/{id}``
(one's metadata), and its content at the same path with ``.json``, ``.srt``, ``.vtt`` or
``.txt``; the ``Transcription`` object has ``id``, ``recordingId`` (UUIDs), ``status``,
``stereo``, ``locale``, ``createdAt``, ``updatedAt`` (required) and ``url``, ``summary``.

What we assume, because the documentation does not say (see the README, "Transcriptions"):

1. ``GET /workspaces/{ws}/recordings/{recordingId}/transcriptions`` (the path the POST goes
   to) lists that recording's transcriptions in the list shape (``results``,
   ``nextPageToken``). Listing the whole workspace each night instead would cost tens of
   thousands of pages at millions of transcriptions. Tolerated: a bare ``Transcription``
   object there counts as a one-item list; a 404 means "none yet".
2. Status ``available`` means ready; ``failed`` or ``error`` that Bird gave up (final);
   anything else (``accepted``, ``processing``, values never seen) not ready yet.
3. ``.json`` is offered for every available transcription; ``.txt`` may answer 404 (then
   only ``.json`` is archived).

Parsing is strict where it matters (a malformed object is a :class:`PayloadError` for that
recording, never a traceback): required fields present and of their type, IDs UUIDs, and
``recordingId`` the recording asked about. Fields Bird may add later are ignored, and ``url``
(possibly a presigned link: a credential) and ``summary`` are never kept.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from recarchive.bird.answer import NOT_A_CHILD
from recarchive.bird.client import BirdClient
from recarchive.bird.limits import parse_json_object
from recarchive.errors import ClientRequestError, NotFoundError, PayloadError

#: Bird's status of a transcription that is ready.
READY = "available"
#: Statuses in which Bird gave up on a transcription: nothing will ever be there.
GAVE_UP = frozenset({"failed", "error"})
#: Formats recarchive archives: ``.json`` always, ``.txt`` where Bird offers it.
ARCHIVED_FORMATS = ("json", "txt")
#: List pages followed for one recording before the answer is refused as endless.
MAX_PAGES = 20
PAGE_SIZE = 99
_LOCALE = re.compile(r"^[A-Za-z0-9_-]{1,35}$")
_STATUS = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Transcription:
    """What recarchive keeps of one ``Transcription`` object.

    Attributes:
        id: Canonical lowercase UUID.
        recording_id: The recording it transcribes (canonical).
        status: Bird's status, as sent.
        locale: e.g. ``en-US``.
        stereo: One channel per party.
        created_at: ``createdAt``, aware UTC.
        updated_at: ``updatedAt``, aware UTC.
        problem: Why the listed object was refused, when only its ``id`` could be read: that
            transcription fails (and is looked at again), its well-formed siblings go on.
    """

    id: str
    recording_id: str
    status: str
    locale: str
    stereo: bool
    created_at: datetime
    updated_at: datetime
    problem: str | None = None

    @property
    def ready(self) -> bool:
        """Bird has its content (assumption 2)."""
        return self.status == READY

    @property
    def gave_up(self) -> bool:
        """Bird will never have its content (assumption 2)."""
        return self.status.lower() in GAVE_UP


def _uuid(value: Any, field: str, what: str) -> str:
    if not isinstance(value, str) or len(value) != 36:
        raise PayloadError(f"{what}: {field} is not a UUID", field=field)
    try:
        return str(uuid.UUID(value))
    except ValueError as exc:
        raise PayloadError(f"{what}: {field} is not a UUID", field=field) from exc


def _moment(value: Any, field: str, what: str) -> datetime:
    if not isinstance(value, str) or len(value) > 40:
        raise PayloadError(f"{what}: {field} is not a timestamp", field=field)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise PayloadError(f"{what}: {field} is not a timestamp", field=field) from exc
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_transcription(item: Any, recording_id: str, what: str) -> Transcription:
    """One ``Transcription`` object of ``recording_id``, checked.

    Raises:
        PayloadError: Not an object, a required field missing or of the wrong type, or the
            transcription belongs to another recording.
    """
    if not isinstance(item, dict):
        raise PayloadError(f"{what}: a transcription is not an object", field="results")
    for name in ("id", "recordingId", "status", "stereo", "locale", "createdAt", "updatedAt"):
        if name not in item:
            raise PayloadError(f"{what}: a transcription has no {name!r}", field=name)
    transcription_id = _uuid(item["id"], "id", what)
    owner = _uuid(item["recordingId"], "recordingId", what)
    if owner != recording_id:
        raise PayloadError(
            f"{what}: transcription {transcription_id} belongs to recording {owner}",
            field="recordingId",
        )
    status, locale, stereo = item["status"], item["locale"], item["stereo"]
    if not isinstance(status, str) or not _STATUS.match(status):
        raise PayloadError(f"{what}: transcription {transcription_id}: bad status", field="status")
    if not isinstance(locale, str) or not _LOCALE.match(locale):
        raise PayloadError(f"{what}: transcription {transcription_id}: bad locale", field="locale")
    if not isinstance(stereo, bool):
        raise PayloadError(f"{what}: transcription {transcription_id}: bad stereo", field="stereo")
    for name in ("url", "summary"):
        if item.get(name) is not None and not isinstance(item[name], str):
            raise PayloadError(f"{what}: transcription {transcription_id}: bad {name}", field=name)
    return Transcription(
        id=transcription_id,
        recording_id=owner,
        status=status,
        locale=locale,
        stereo=stereo,
        created_at=_moment(item["createdAt"], "createdAt", what),
        updated_at=_moment(item["updatedAt"], "updatedAt", what),
    )


class TranscriptionsClient:
    """The read-only transcription calls of one :class:`BirdClient`.

    Args:
        bird: The client (its pacing, retries, limits and key).
    """

    def __init__(self, bird: BirdClient) -> None:
        self._bird = bird
        workspace = f"{bird.api_url}/workspaces/{quote(bird.workspace_id, safe='')}"
        self._recordings = f"{workspace}/recordings"
        self._transcriptions = f"{workspace}/transcriptions"

    async def for_recording(self, recording_id: str) -> list[Transcription]:
        """Every transcription Bird has for ``recording_id`` (assumption 1), oldest first.

        Raises:
            PayloadError: A page is not of the list shape (or a bare transcription), a
                transcription is malformed or another recording's, the page token repeats,
                or there are more than :data:`MAX_PAGES` pages.
            RetryableError: Still failing after the client's retries.
            AuthError: The key was refused (stops the run).
            ClientRequestError: The ID is empty, ``.`` or ``..``: its URL would list the
                workspace's transcriptions, not a recording's (nothing is sent).
        """
        if recording_id in NOT_A_CHILD:  # as BirdClient refuses it for the recording's URL
            raise ClientRequestError(f"not a recording ID: {recording_id!r}", status_code=None)
        url = f"{self._recordings}/{quote(recording_id, safe='')}/transcriptions"
        found: dict[str, Transcription] = {}
        token: str | None = None
        for page in range(1, MAX_PAGES + 1):
            what = f"transcriptions of {recording_id}, page {page}"
            params = {"limit": str(PAGE_SIZE), **({"pageToken": token} if token else {})}
            try:
                answer = await self._bird.send("GET", url, params=params, what=what)
            except NotFoundError:
                if page == 1:
                    return []  # assumption 1: no transcription yet
                raise
            body = self._bird.json_object(answer, what)
            if "results" not in body and "id" in body:
                item = parse_transcription(body, recording_id, what)  # a bare object
                return [item]
            results = body.get("results")
            if not isinstance(results, list):
                raise PayloadError(f"{what}: 'results' is not a list", field="results")
            for raw in results:
                try:
                    item = parse_transcription(raw, recording_id, what)
                except PayloadError as error:
                    # One malformed object must not keep its siblings from being archived.
                    item = _refused(raw, recording_id, error)
                found.setdefault(item.id, item)
            next_token = body.get("nextPageToken")
            if not next_token:
                return sorted(found.values(), key=lambda t: (t.created_at, t.id))
            if not isinstance(next_token, str) or next_token == token:
                raise PayloadError(f"{what}: bad or repeated nextPageToken", field="nextPageToken")
            token = next_token
        raise PayloadError(
            f"transcriptions of {recording_id}: more than {MAX_PAGES} pages; refused",
            field="nextPageToken",
        )

    async def content(
        self, transcription_id: str, fmt: str, recording_id: str | None = None
    ) -> bytes | None:
        """One format of a transcription's content, checked; ``None`` when Bird has none (404).

        ``.json`` must be JSON (any top-level value, nested no deeper than the limit) and
        ``.txt`` UTF-8 text: an HTML error page is never stored as a transcription. A JSON
        object that names its ``id`` or ``recordingId`` must name ``transcription_id`` and
        ``recording_id``: another transcription's content is never stored under this one's key.

        Raises:
            PayloadError: Larger than ``transcription_max_bytes``, not of its format, or the
                content of another transcription or recording.
            RetryableError: Still failing after the client's retries.
        """
        if fmt not in ARCHIVED_FORMATS:
            raise ValueError(f"not an archived format: {fmt}")
        bird = self._bird
        limits = dataclasses.replace(
            bird.limits,
            metadata_max_bytes=bird.limits.transcription_max_bytes,
            body_limit_name="the limit of a transcription's content",
        )
        what = f"transcription {transcription_id}.{fmt}"
        url = f"{self._transcriptions}/{quote(transcription_id, safe='')}.{fmt}"
        try:
            answer = await bird.send("GET", url, what=what, limits=limits)
        except NotFoundError:
            return None
        data = answer.content
        if fmt == "json":
            document = _check_json(data, what, bird.limits.json_max_depth)
            if isinstance(document, dict):
                _check_identity(document, transcription_id, recording_id, what)
        else:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PayloadError(f"{what}: not UTF-8 text", field="<body>") from exc
        return data


def _check_json(data: bytes, what: str, max_depth: int) -> Any:
    """Refuse a ``.json`` body that is not JSON (wrapped so an array passes the object check).

    Returns:
        The parsed document.
    """
    try:
        text = data.decode("utf-8")
        document = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PayloadError(f"{what}: not JSON", field="<body>") from exc
    parse_json_object(b'{"content":' + data + b"}", what, max_depth=max_depth)
    return document


def _check_identity(
    document: dict[str, Any], transcription_id: str, recording_id: str | None, what: str
) -> None:
    """Refuse content whose own ``id`` / ``recordingId`` name another transcription."""
    for name, expected in (("id", transcription_id), ("recordingId", recording_id)):
        if name not in document or expected is None:
            continue
        value = document[name]
        try:
            same = isinstance(value, str) and str(uuid.UUID(value)) == expected
        except ValueError:
            same = False
        if not same:
            raise PayloadError(f"{what}: its {name} is not {expected}", field=name)


def _refused(raw: Any, recording_id: str, error: PayloadError) -> Transcription:
    """The stand-in of a malformed listed object whose ``id`` is readable, else ``error``.

    Raises:
        PayloadError: ``error``, when the object has no readable ``id``: the whole listing
            fails then, as nothing could name what failed.
    """
    if not isinstance(raw, dict):
        raise error
    try:
        transcription_id = _uuid(raw.get("id"), "id", "")
    except PayloadError:
        raise error from None
    never = datetime.min.replace(tzinfo=UTC)
    return Transcription(
        id=transcription_id,
        recording_id=recording_id,
        status="refused",
        locale="",
        stereo=False,
        created_at=never,
        updated_at=never,
        problem=str(error),
    )
