"""Pure normalization of a Bird recording payload into ``recordings`` and party rows.

No I/O here. :func:`normalize_recording` is total: for any input it returns a
:class:`~recarchive.model.NormalizedRecording` or raises :class:`~recarchive.errors.PayloadError`
naming the field at fault, so one bad payload fails one recording, never the run.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from recarchive.errors import PayloadError
from recarchive.model import PARTY_ROLES, NormalizedRecording
from recarchive.redaction import redact, strip_url

T = TypeVar("T")

#: Bird's "not set" timestamp (``0001-01-01T00:00:00Z``).
ZERO_DATE = datetime(1, 1, 1, tzinfo=UTC)

_MISSING = object()

#: ``raw_json``'s encoder, built once (``json.dumps`` with these arguments builds one per call).
#: Sorted keys: the same payload always gives the same text, so "unchanged" is exact.
#: NaN/Infinity are allowed: an unknown field holding one (json.loads accepts them) must not
#: fail the recording; known numeric fields are checked to be finite.
_RAW_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))

#: A UUID already in canonical form (the usual case) needs no parsing.
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def normalize_recording(
    payload: Mapping[str, Any], *, workspace_id: str, fetched_at: datetime
) -> NormalizedRecording:
    """Turn one API payload into rows.

    Args:
        payload: The JSON object of ``GET /workspaces/{ws}/recordings/{id}``.
        workspace_id: The workspace the recording was fetched from.
        fetched_at: When it was fetched (stored as ``fetched_at``).

    Returns:
        The recording row, its party rows and the redacted payload.

    Raises:
        PayloadError: A required field is missing, or a field has the wrong type; ``field``
            names it (dotted path).
    """
    if not isinstance(payload, Mapping):
        raise PayloadError("payload is not a JSON object", field="$")
    try:
        return _normalize(payload, workspace_id, fetched_at)
    except PayloadError:
        raise
    except RecursionError as exc:
        raise PayloadError("payload is nested too deeply", field="$") from exc
    except (TypeError, ValueError, OverflowError) as exc:
        # Only reachable for values no JSON parser produces (e.g. non-string keys).
        raise PayloadError(
            f"payload is not JSON-serializable: {type(exc).__name__}", field="$"
        ) from exc


def _normalize(
    payload: Mapping[str, Any], workspace_id: str, fetched_at: datetime
) -> NormalizedRecording:
    # Rows are read from the redacted payload: every column (SQL, Parquet) holds exactly the
    # text raw_json and the sidecar hold, with signed URLs and passwords already cut.
    redacted: dict[str, Any] = _redact(payload)
    payload = redacted
    recording_id = _uuid(payload, "id")
    created_at = _required_time(payload, "createdAt")
    updated_at = _required_time(payload, "updatedAt")
    recording: dict[str, Any] = {"id": recording_id, "workspace_id": workspace_id}
    _read_fields(payload, _TOP_FIELDS, "", recording)
    recording["created_at"] = created_at
    recording["updated_at"] = updated_at
    ended = payload.get("endedAt")
    recording["ended_at"] = None if ended is None else _time(ended, "endedAt")
    started = payload.get("startedAt")
    recording["started_at"] = None if started is None else _time(started, "startedAt")
    recording["created_month"] = f"{created_at.year:04d}-{created_at.month:02d}"
    recording["fetched_at"] = fetched_at.astimezone(UTC)
    recording["raw_json"] = _RAW_JSON.encode(redacted)
    parties = [
        party for role in PARTY_ROLES if (party := _party(payload, role, recording_id)) is not None
    ]
    status: str = recording["status"]
    return NormalizedRecording(
        id=recording_id,
        workspace_id=workspace_id,
        status=status,
        created_at=created_at,
        updated_at=updated_at,
        recording=recording,
        parties=parties,
        redacted_payload=redacted,
    )


def _party(payload: Mapping[str, Any], role: str, recording_id: str) -> dict[str, Any] | None:
    # The payload is the redacted copy: its objects are plain dicts (the exact type check is
    # the hot path; anything else is refused by _object, naming the field).
    side = payload.get(role)
    if side is None:
        return None
    if type(side) is not dict:
        side = _object(side, role)
    party: dict[str, Any] = {"recording_id": recording_id, "role": role}
    for group, fields in _PARTY_GROUPS:
        data = side.get(group)
        if data is None:
            data = {}
        elif type(data) is not dict:
            data = _object(data, f"{role}.{group}")
        _read_fields(data, fields, f"{role}.{group}", party)
    return party


# --- field readers -------------------------------------------------------------------------

Reader = Callable[[Any, str], Any]


def _read_fields(
    data: Mapping[str, Any],
    fields: tuple[tuple[str, str, Reader, bool], ...],
    parent: str,
    row: dict[str, Any],
) -> None:
    """Read ``(key, column, reader, required)`` fields of ``data`` into ``row``."""
    get = data.get
    for key, column, reader, required in fields:
        value = get(key)
        if value is None:
            if required:
                field = _path(parent, key)
                raise PayloadError(f"required field {field} is missing", field=field)
            row[column] = None
        # Hot path, inlined: a clean ASCII string or a bool needs no conversion (one call
        # less per field than asking _plain).
        elif (
            type(value) is str and reader is _str and value.isascii() and "\x00" not in value
        ) or (type(value) is bool and reader is _bool):
            row[column] = value
        else:
            row[column] = reader(value, _path(parent, key))


# --- field readers -------------------------------------------------------------------------


def _path(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def _req(
    data: Mapping[str, Any], key: str, convert: Callable[[Any, str], T], parent: str = ""
) -> T:
    value = data.get(key, _MISSING)
    if value is not _MISSING and value is not None and _plain(value, convert):
        return value  # type: ignore[no-any-return]
    field = _path(parent, key)
    if value is _MISSING or value is None:
        raise PayloadError(f"required field {field} is missing", field=field)
    return convert(value, field)


def _plain(value: Any, convert: Callable[[Any, str], Any]) -> bool:
    """Fast path for the common case: a clean ASCII string or a bool, needing no conversion."""
    kind = type(value)
    if convert is _str:
        return kind is str and _clean_text(value)
    return convert is _bool and kind is bool


def _clean_text(value: str) -> bool:
    """ASCII and no NUL: the (already redacted) string is stored exactly as it is."""
    return value.isascii() and "\x00" not in value


def _str(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise PayloadError(f"{field} must be a string, not {_kind(value)}", field=field)
    # PostgreSQL text cannot hold NUL, and lone surrogates cannot be encoded: refuse the
    # recording here rather than failing the whole chunk's transaction later.
    if "\x00" in value:
        raise PayloadError(f"{field} contains a NUL character", field=field)
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PayloadError(f"{field} is not valid Unicode text", field=field) from exc
    return value


def _url(value: Any, field: str) -> str:
    """A URL without its credentials; checked after stripping, as the query is dropped."""
    if not isinstance(value, str):
        raise PayloadError(f"{field} must be a string, not {_kind(value)}", field=field)
    return _str(strip_url(value), field)


def _bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise PayloadError(f"{field} must be a boolean, not {_kind(value)}", field=field)
    return value


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PayloadError(f"{field} must be a number, not {_kind(value)}", field=field)
    try:
        number = float(value)
    except OverflowError as exc:
        raise PayloadError(f"{field} is out of range", field=field) from exc
    if not math.isfinite(number):
        raise PayloadError(f"{field} must be a finite number", field=field)
    return number


def _object(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PayloadError(f"{field} must be an object, not {_kind(value)}", field=field)
    return value


def _uuid(data: Mapping[str, Any], key: str) -> str:
    text = data.get(key)
    # A canonical UUID (the usual case) is clean ASCII already: no further checks.
    if type(text) is str and _CANONICAL_UUID.fullmatch(text):
        return text
    text = _req(data, key, _str)
    try:
        return str(uuid.UUID(text))
    except ValueError as exc:
        raise PayloadError(f"{key} is not a UUID", field=key) from exc


def _time(value: Any, field: str) -> datetime | None:
    """Parse an ISO 8601 timestamp to UTC; the zero date means "not set" (``None``)."""
    text = value if type(value) is str and value.isascii() and "\x00" not in value else None
    if text is None:
        text = _str(value, field)
    try:
        parsed = datetime.fromisoformat(text)
        # Bird sends "...Z", parsed as UTC itself: nothing to convert (the usual case).
        if parsed.tzinfo is not UTC:
            if parsed.tzinfo is None:
                # Bird always sends UTC; a timestamp without offset is read as UTC too.
                parsed = parsed.replace(tzinfo=UTC)
            parsed = parsed.astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise PayloadError(f"{field} is not an ISO 8601 timestamp", field=field) from exc
    return None if parsed == ZERO_DATE else parsed


def _required_time(data: Mapping[str, Any], key: str) -> datetime:
    parsed = _req(data, key, _time)
    if parsed is None:
        raise PayloadError(f"required field {key} is the zero date", field=key)
    return parsed


def _kind(value: Any) -> str:
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)


_TOP_FIELDS: tuple[tuple[str, str, Reader, bool], ...] = (
    ("source", "source", _str, True),
    ("sourceId", "source_id", _str, True),
    ("channelId", "channel_id", _str, False),
    ("status", "status", _str, True),
    ("direction", "direction", _str, False),
    ("origin", "origin", _str, True),
    ("duration", "duration", _number, False),
    ("stereo", "stereo", _bool, True),
    ("format", "format", _str, True),
    ("transcription", "transcription", _bool, True),
    ("conferenceId", "conference_id", _str, False),
    ("url", "url", _url, False),
    ("roomInfoUrl", "room_info_url", _url, False),
)

_PARTY_GROUPS: tuple[tuple[str, tuple[tuple[str, str, Reader, bool], ...]], ...] = (
    (
        "contact",
        (
            ("id", "contact_id", _str, False),
            ("identifierKey", "contact_identifier_key", _str, False),
            ("identifierValue", "contact_identifier_value", _str, False),
        ),
    ),
    (
        "number",
        (
            ("type", "number_type", _str, False),
            ("number", "number", _str, False),
            ("anonymous", "number_anonymous", _bool, False),
            ("callerIdName", "number_caller_id_name", _str, False),
            ("identity", "number_identity", _str, False),
            ("countryIsoCode", "number_country_iso_code", _str, False),
        ),
    ),
)


# --- redaction -----------------------------------------------------------------------------


#: Whether a key names a URL field, learnt per key (payloads repeat the same few dozen keys).
#: Bounded, so hostile payloads with ever new keys cannot grow it without limit.
_URL_KEYS: dict[Any, bool] = {}
_URL_KEYS_MAX = 4096


def _url_key(key: Any) -> bool:
    """Whether ``key`` names a URL field: ``url``/``uri`` at its end, any case, plural too."""
    is_url = type(key) is str and key.lower().rstrip("s")[-3:] in ("url", "uri")
    if len(_URL_KEYS) < _URL_KEYS_MAX:
        _URL_KEYS[key] = is_url
    return is_url


def _redact(value: Any, url_field: bool = False) -> Any:
    # Hot path (every payload): exact type checks first, the ABC checks only as a fallback;
    # the strings of an object are redacted in its loop, without a call of _redact each.
    # Fields named *url* are always stripped to scheme, host and path; any other string goes
    # through the one redaction function (a signed URL inside a longer text, a password).
    kind = type(value)
    if kind is str:
        return strip_url(value) if url_field else redact(value)
    if kind is dict or (kind is not list and isinstance(value, Mapping)):
        url_keys = _URL_KEYS
        copied: dict[Any, Any] = {}
        for key, item in value.items():
            item_kind = type(item)
            if item_kind is str:
                is_url = url_keys.get(key)
                if is_url is None:
                    is_url = _url_key(key)
                item = strip_url(item) if is_url else redact(item)
            elif (
                item_kind is dict
                or item_kind is list
                or (item is not None and item_kind not in _SCALARS)
            ):
                is_url = url_keys.get(key)
                if is_url is None:
                    is_url = _url_key(key)
                item = _redact(item, is_url)
            copied[key] = item
        return copied
    if kind is list or isinstance(value, list | tuple):
        return [_redact(item, url_field) for item in value]
    return value


_SCALARS = frozenset({int, float, bool})


def redact_payload(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Return a deep copy of ``payload`` with every URL-like field stripped of credentials.

    Fields named ``url`` or ending in ``Url`` (at any depth) keep scheme, host and path only.

    Args:
        payload: The API payload.

    Returns:
        The redacted copy (unknown fields kept).
    """
    redacted: dict[str, Any] = _redact(payload)
    return redacted
