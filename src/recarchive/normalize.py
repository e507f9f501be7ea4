"""Pure normalization of a Bird recording payload into ``recordings`` and party rows.

No I/O here. :func:`normalize_recording` is total: for any input it returns a
:class:`~recarchive.model.NormalizedRecording` or raises :class:`~recarchive.errors.PayloadError`
naming the field at fault, so one bad payload fails one recording, never the run.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from recarchive.errors import PayloadError
from recarchive.model import PARTY_ROLES, NormalizedRecording

T = TypeVar("T")

#: Bird's "not set" timestamp (``0001-01-01T00:00:00Z``).
ZERO_DATE = datetime(1, 1, 1, tzinfo=UTC)

_MISSING = object()


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
        raise PayloadError(f"payload is not JSON-serializable: {type(exc).__name__}",
                           field="$") from exc


def _normalize(
    payload: Mapping[str, Any], workspace_id: str, fetched_at: datetime
) -> NormalizedRecording:
    recording_id = _uuid(payload, "id")
    created_at = _required_time(payload, "createdAt")
    updated_at = _required_time(payload, "updatedAt")
    status = _req(payload, "status", _str)
    redacted = redact_payload(payload)
    url = _opt(payload, "url", _str)
    room_info_url = _opt(payload, "roomInfoUrl", _str)
    recording: dict[str, Any] = {
        "id": recording_id,
        "workspace_id": workspace_id,
        "source": _req(payload, "source", _str),
        "source_id": _req(payload, "sourceId", _str),
        "channel_id": _opt(payload, "channelId", _str),
        "status": status,
        "direction": _opt(payload, "direction", _str),
        "origin": _req(payload, "origin", _str),
        "duration": _opt(payload, "duration", _number),
        "stereo": _req(payload, "stereo", _bool),
        "format": _req(payload, "format", _str),
        "transcription": _req(payload, "transcription", _bool),
        "conference_id": _opt(payload, "conferenceId", _str),
        "url": strip_url(url) if url is not None else None,
        "room_info_url": strip_url(room_info_url) if room_info_url is not None else None,
        "created_at": created_at,
        "updated_at": updated_at,
        "ended_at": _opt(payload, "endedAt", _time),
        "started_at": _opt(payload, "startedAt", _time),
        "created_month": f"{created_at.year:04d}-{created_at.month:02d}",
        "fetched_at": fetched_at.astimezone(UTC),
        # allow_nan: an unknown field holding Infinity (which json.loads accepts) must not
        # fail the recording; known numeric fields are checked to be finite above.
        "raw_json": json.dumps(redacted, sort_keys=True, separators=(",", ":")),
    }
    parties = [
        party
        for role in PARTY_ROLES
        if (party := _party(payload, role, recording_id)) is not None
    ]
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
    side = _opt(payload, role, _object)
    if side is None:
        return None
    contact = _opt(side, "contact", _object, role) or {}
    number = _opt(side, "number", _object, role) or {}
    c, n = f"{role}.contact", f"{role}.number"
    return {
        "recording_id": recording_id,
        "role": role,
        "contact_id": _opt(contact, "id", _str, c),
        "contact_identifier_key": _opt(contact, "identifierKey", _str, c),
        "contact_identifier_value": _opt(contact, "identifierValue", _str, c),
        "number_type": _opt(number, "type", _str, n),
        "number": _opt(number, "number", _str, n),
        "number_anonymous": _opt(number, "anonymous", _bool, n),
        "number_caller_id_name": _opt(number, "callerIdName", _str, n),
        "number_identity": _opt(number, "identity", _str, n),
        "number_country_iso_code": _opt(number, "countryIsoCode", _str, n),
    }


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


def _opt(
    data: Mapping[str, Any], key: str, convert: Callable[[Any, str], T], parent: str = ""
) -> T | None:
    value = data.get(key)
    if value is None:
        return None
    if _plain(value, convert):
        return value  # type: ignore[no-any-return]
    return convert(value, _path(parent, key))


def _plain(value: Any, convert: Callable[[Any, str], Any]) -> bool:
    """Fast path for the common case: a clean ASCII string or a bool, needing no conversion."""
    kind = type(value)
    if convert is _str:
        return kind is str and value.isascii() and "\x00" not in value
    return convert is _bool and kind is bool


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
    text = _req(data, key, _str)
    try:
        return str(uuid.UUID(text))
    except ValueError as exc:
        raise PayloadError(f"{key} is not a UUID", field=key) from exc


def _time(value: Any, field: str) -> datetime | None:
    """Parse an ISO 8601 timestamp to UTC; the zero date means "not set" (``None``)."""
    text = _str(value, field)
    try:
        parsed = datetime.fromisoformat(text)
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
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# --- redaction -----------------------------------------------------------------------------


def strip_url(url: str) -> str:
    """Return ``url`` without query string, fragment and user info.

    The query string of a presigned URL is a credential; only scheme, host and path are kept.
    """
    cut = url.split("?", 1)[0].split("#", 1)[0]
    try:
        parts = urlsplit(cut)
        netloc = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        # Unparseable (e.g. a broken IPv6 host): the query is cut already; drop user info.
        scheme, sep, rest = cut.partition("://")
        return scheme + sep + rest.rsplit("@", 1)[-1] if sep else cut


def _redact(value: Any) -> Any:
    # Hot path (every payload): exact type checks first, the ABC checks only as a fallback.
    kind = type(value)
    if kind is dict or (kind is not list and isinstance(value, Mapping)):
        copied: dict[Any, Any] = {}
        for key, item in value.items():
            if type(item) is str:
                if type(key) is str and key[-3:].lower() == "url":
                    item = strip_url(item)
            elif type(item) in (dict, list) or isinstance(item, Mapping | list | tuple):
                item = _redact(item)
            copied[key] = item
        return copied
    if kind is list or isinstance(value, list | tuple):
        return [_redact(item) for item in value]
    return value


def redact_payload(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Return a deep copy of ``payload`` with every URL-like field stripped of credentials.

    Fields named ``url`` or ending in ``Url`` (at any depth) keep scheme, host and path only.

    Args:
        payload: The API payload.

    Returns:
        The redacted copy (unknown fields kept).
    """
    return dict(_redact(payload))
