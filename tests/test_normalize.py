"""normalize_recording: field mapping, timestamps, redaction, and totality (hypothesis)."""

from __future__ import annotations

import copy
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recarchive.errors import PayloadError
from recarchive.model import PARTY_FIELDS
from recarchive.normalize import normalize_recording, redact_payload
from recarchive.redaction import strip_url

FETCHED = datetime(2025, 7, 11, 8, 0, tzinfo=UTC)

#: The example payload of the seed document ("Get a Recording"), verbatim.
SEED_PAYLOAD: dict[str, Any] = {
    "id": "123e4567-e89b-12d3-a456-426614174000",
    "source": "call",
    "sourceId": "123e4567-e89b-12d3-a456-426614174000",
    "channelId": "123e4567-e89b-12d3-a456-426614174000",
    "status": "accepted",
    "direction": "incoming",
    "originator": {
        "contact": {"id": "text", "identifierKey": "text", "identifierValue": "text"},
        "number": {
            "type": "pstn",
            "number": "text",
            "anonymous": True,
            "callerIdName": "text",
            "identity": "text",
            "countryIsoCode": "text",
        },
    },
    "receiver": {
        "contact": {"id": "text", "identifierKey": "text", "identifierValue": "text"},
        "number": {
            "type": "pstn",
            "number": "text",
            "anonymous": True,
            "callerIdName": "text",
            "identity": "text",
            "countryIsoCode": "text",
        },
    },
    "origin": "call-command-record",
    "duration": 1,
    "stereo": True,
    "format": "text",
    "transcription": True,
    "conferenceId": "123e4567-e89b-12d3-a456-426614174000",
    "url": "text",
    "roomInfoUrl": "text",
    "createdAt": "2025-07-10T02:10:43.130Z",
    "updatedAt": "2025-07-10T02:10:43.130Z",
    "endedAt": "2025-07-10T02:10:43.130Z",
    "startedAt": "2025-07-10T02:10:43.130Z",
}

REQUIRED = [
    "id",
    "source",
    "sourceId",
    "status",
    "origin",
    "stereo",
    "format",
    "transcription",
    "createdAt",
    "updatedAt",
]


def make_payload(
    index: int = 0,
    *,
    created: datetime = datetime(2025, 7, 10, 2, 10, 43, 130000, tzinfo=UTC),
    updated: datetime | None = None,
    status: str = "available",
    **overrides: Any,
) -> dict[str, Any]:
    """A realistic payload (the seed's shape) for recording number ``index``."""
    recording_id = str(uuid.UUID(int=index + 1))
    stamp = (updated or created).isoformat().replace("+00:00", "Z")
    payload: dict[str, Any] = {
        "id": recording_id,
        "source": "call",
        "sourceId": str(uuid.UUID(int=10**9 + index)),
        "channelId": "5a9e1c43-0000-4000-8000-00000000c0de",
        "status": status,
        "direction": "incoming" if index % 2 else "outgoing",
        "originator": {
            "contact": {
                "id": f"contact-{index}",
                "identifierKey": "phonenumber",
                "identifierValue": f"+3161234{index:04d}",
            },
            "number": {
                "type": "pstn",
                "number": f"+3161234{index:04d}",
                "anonymous": False,
                "callerIdName": f"Caller {index}",
                "identity": "verified",
                "countryIsoCode": "NL",
            },
        },
        "receiver": {
            "contact": {
                "id": "contact-desk",
                "identifierKey": "phonenumber",
                "identifierValue": "+31201234567",
            },
            "number": {
                "type": "pstn",
                "number": "+31201234567",
                "anonymous": False,
                "callerIdName": None,
                "identity": None,
                "countryIsoCode": "NL",
            },
        },
        "origin": "call-command-record",
        "duration": 30 + index % 600,
        "stereo": index % 3 == 0,
        "format": "mp3",
        "transcription": False,
        "conferenceId": None,
        "url": f"https://media.example.com/rec/{recording_id}.mp3?X-Amz-Signature=secret{index}",
        "roomInfoUrl": None,
        "createdAt": created.isoformat().replace("+00:00", "Z"),
        "updatedAt": stamp,
        "endedAt": (created + timedelta(minutes=5)).isoformat().replace("+00:00", "Z"),
        "startedAt": created.isoformat().replace("+00:00", "Z"),
    }
    payload.update(overrides)
    return payload


def norm(payload: Any) -> Any:
    return normalize_recording(payload, workspace_id="ws-1", fetched_at=FETCHED)


# --- mapping ----------------------------------------------------------------------------------


def test_seed_document_maps_every_field() -> None:
    record = norm(SEED_PAYLOAD)
    ts = datetime(2025, 7, 10, 2, 10, 43, 130000, tzinfo=UTC)
    assert record.id == "123e4567-e89b-12d3-a456-426614174000"
    assert record.workspace_id == "ws-1"
    assert record.status == "accepted"
    assert record.created_at == ts and record.updated_at == ts
    row = record.recording
    assert row == {
        "id": "123e4567-e89b-12d3-a456-426614174000",
        "workspace_id": "ws-1",
        "source": "call",
        "source_id": "123e4567-e89b-12d3-a456-426614174000",
        "channel_id": "123e4567-e89b-12d3-a456-426614174000",
        "status": "accepted",
        "direction": "incoming",
        "origin": "call-command-record",
        "duration": 1.0,
        "stereo": True,
        "format": "text",
        "transcription": True,
        "conference_id": "123e4567-e89b-12d3-a456-426614174000",
        "url": "text",
        "room_info_url": "text",
        "created_at": ts,
        "updated_at": ts,
        "ended_at": ts,
        "started_at": ts,
        "created_month": "2025-07",
        "fetched_at": FETCHED,
        "raw_json": json.dumps(SEED_PAYLOAD, sort_keys=True, separators=(",", ":")),
    }
    assert [party["role"] for party in record.parties] == ["originator", "receiver"]
    for party in record.parties:
        assert party == {
            "recording_id": record.id,
            "role": party["role"],
            "contact_id": "text",
            "contact_identifier_key": "text",
            "contact_identifier_value": "text",
            "number_type": "pstn",
            "number": "text",
            "number_anonymous": True,
            "number_caller_id_name": "text",
            "number_identity": "text",
            "number_country_iso_code": "text",
        }
    assert set(record.parties[0]) == {"recording_id", "role", *PARTY_FIELDS}


def test_optional_fields_absent_or_null() -> None:
    payload = {key: SEED_PAYLOAD[key] for key in REQUIRED}
    record = norm(payload)
    assert record.parties == []
    for column in (
        "channel_id",
        "direction",
        "duration",
        "conference_id",
        "url",
        "room_info_url",
        "ended_at",
        "started_at",
    ):
        assert record.recording[column] is None
    payload["originator"] = {"contact": None, "number": {"number": "+1"}}
    payload["receiver"] = None
    (party,) = norm(payload).parties
    assert party["role"] == "originator"
    assert party["number"] == "+1" and party["contact_id"] is None


def test_unknown_status_and_fields_are_kept() -> None:
    payload = make_payload(status="transcoding", newField={"nested": [1, 2]})
    record = norm(payload)
    assert record.status == "transcoding" and record.recording["status"] == "transcoding"
    assert json.loads(record.recording["raw_json"])["newField"] == {"nested": [1, 2]}
    assert record.redacted_payload["newField"] == {"nested": [1, 2]}


def test_id_is_canonicalized() -> None:
    record = norm(make_payload(id="123E4567E89B12D3A456426614174000"))
    assert record.id == "123e4567-e89b-12d3-a456-426614174000"
    assert record.recording["id"] == record.id


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-07-10T02:10:43Z", datetime(2025, 7, 10, 2, 10, 43, tzinfo=UTC)),
        ("2025-07-10T02:10:43.1Z", datetime(2025, 7, 10, 2, 10, 43, 100000, tzinfo=UTC)),
        ("2025-07-10T02:10:43.123456789Z", datetime(2025, 7, 10, 2, 10, 43, 123456, tzinfo=UTC)),
        ("2025-07-10T04:10:43+02:00", datetime(2025, 7, 10, 2, 10, 43, tzinfo=UTC)),
        ("2025-07-09T21:10:43.5-05:00", datetime(2025, 7, 10, 2, 10, 43, 500000, tzinfo=UTC)),
        ("2025-07-10T02:10:43", datetime(2025, 7, 10, 2, 10, 43, tzinfo=UTC)),
        ("0001-01-01T00:00:00Z", None),
        ("0001-01-01T00:00:00.000Z", None),
    ],
)
def test_timestamps_to_utc(text: str, expected: datetime | None) -> None:
    record = norm(make_payload(endedAt=text))
    assert record.recording["ended_at"] == expected
    if expected is not None:
        assert record.recording["ended_at"].utcoffset() == timedelta(0)


def test_offset_moves_created_month() -> None:
    record = norm(make_payload(createdAt="2025-08-01T01:30:00+02:00"))
    assert record.created_at == datetime(2025, 7, 31, 23, 30, tzinfo=UTC)
    assert record.recording["created_month"] == "2025-07"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"id": None}, "id"),
        ({"id": "not-a-uuid"}, "id"),
        ({"id": 5}, "id"),
        ({"source": None}, "source"),
        ({"sourceId": 3}, "sourceId"),
        ({"status": ["available"]}, "status"),
        ({"origin": None}, "origin"),
        ({"stereo": "true"}, "stereo"),
        ({"stereo": 1}, "stereo"),
        ({"format": None}, "format"),
        ({"transcription": None}, "transcription"),
        ({"createdAt": None}, "createdAt"),
        ({"createdAt": "yesterday"}, "createdAt"),
        ({"createdAt": "0001-01-01T00:00:00Z"}, "createdAt"),
        ({"updatedAt": 1720577443}, "updatedAt"),
        ({"endedAt": "2025-13-01T00:00:00Z"}, "endedAt"),
        ({"duration": "30"}, "duration"),
        ({"duration": True}, "duration"),
        ({"duration": float("nan")}, "duration"),
        ({"duration": 10**400}, "duration"),
        ({"direction": 1}, "direction"),
        ({"url": {"href": "x"}}, "url"),
        ({"originator": "alice"}, "originator"),
        ({"receiver": {"contact": []}}, "receiver.contact"),
        ({"receiver": {"number": {"anonymous": "no"}}}, "receiver.number.anonymous"),
        ({"originator": {"number": {"number": 31612345678}}}, "originator.number.number"),
        ({"originator": {"contact": {"id": "a\x00b"}}}, "originator.contact.id"),
        ({"channelId": "\ud800"}, "channelId"),
    ],
)
def test_payload_errors_name_the_field(change: dict[str, Any], field: str) -> None:
    payload = make_payload()
    payload.update(change)
    with pytest.raises(PayloadError) as info:
        norm(payload)
    assert info.value.field == field
    assert field.split(".")[-1] in str(info.value)


@pytest.mark.parametrize("missing", REQUIRED)
def test_missing_required_field(missing: str) -> None:
    payload = make_payload()
    del payload[missing]
    with pytest.raises(PayloadError, match="missing") as info:
        norm(payload)
    assert info.value.field == missing


@pytest.mark.parametrize("payload", [None, [], "x", 3, [make_payload()]])
def test_non_object_payload(payload: Any) -> None:
    with pytest.raises(PayloadError) as info:
        norm(payload)
    assert info.value.field == "$"


# --- redaction --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "https://s3.example.com/b/k.mp3?X-Amz-Signature=abc&X-Amz-Credential=AK",
            "https://s3.example.com/b/k.mp3",
        ),
        ("https://media.api.bird.com/r/1.mp3#frag", "https://media.api.bird.com/r/1.mp3"),
        ("https://user:pw@host.example/p?q=1", "https://host.example/p"),
        ("http://[::1/p?q=secret", "http://[::1/p"),
        ("text", "text"),
    ],
)
def test_strip_url(url: str, expected: str) -> None:
    assert strip_url(url) == expected


def test_redaction_removes_credentials_everywhere() -> None:
    payload = make_payload(
        roomInfoUrl="https://rooms.example.com/r/1?token=room-secret",
        extra={"downloadUrl": "https://x.example/y?sig=deep-secret", "note": "kept?yes"},
    )
    original = copy.deepcopy(payload)
    record = norm(payload)
    assert payload == original, "the input payload must not be modified"
    raw = record.recording["raw_json"]
    for secret in ("secret0", "room-secret", "deep-secret", "X-Amz-Signature"):
        assert secret not in raw
        assert secret not in json.dumps(record.redacted_payload)
    assert record.recording["url"] == f"https://media.example.com/rec/{record.id}.mp3"
    assert record.recording["room_info_url"] == "https://rooms.example.com/r/1"
    assert record.redacted_payload["extra"]["note"] == "kept?yes"
    assert redact_payload(payload) == record.redacted_payload


def test_control_characters_in_a_dropped_query_do_not_matter() -> None:
    record = norm(make_payload(url="https://media.example.com/a.mp3?sig=\x00\ud800"))
    assert record.recording["url"] == "https://media.example.com/a.mp3"


# --- properties -------------------------------------------------------------------------------

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
field_names = st.sampled_from([*SEED_PAYLOAD.keys(), "unknownField"])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text(max_size=12), json_values, max_size=12) | json_values)
def test_total_on_arbitrary_json(payload: Any) -> None:
    try:
        record = norm(payload)
    except PayloadError as exc:
        assert isinstance(exc.field, str) and exc.field
    else:
        assert record.id == record.recording["id"]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(field=field_names, value=json_values, nested=st.booleans())
def test_one_bad_field_is_named(field: str, value: Any, nested: bool) -> None:
    payload = make_payload()
    if nested and field in ("originator", "receiver"):
        payload[field]["number"]["callerIdName"] = value
        field = f"{field}.number.callerIdName"
    else:
        payload[field] = value
    try:
        norm(payload)
    except PayloadError as exc:
        assert exc.field == field or exc.field.startswith(field + ".")


timestamps = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
texts = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=30
)


@settings(max_examples=200)
@given(
    created=timestamps,
    updated=timestamps,
    duration=st.none() | st.integers(0, 10**6) | st.floats(0, 1e6),
    stereo=st.booleans(),
    status=texts,
    number=st.none() | texts,
    anonymous=st.none() | st.booleans(),
    query=st.text(min_size=1, max_size=30),
)
def test_known_fields_round_trip(
    created: datetime,
    updated: datetime,
    duration: float | None,
    stereo: bool,
    status: str,
    number: str | None,
    anonymous: bool | None,
    query: str,
) -> None:
    payload = make_payload(
        7,
        created=created,
        updated=updated,
        status=status,
        duration=duration,
        stereo=stereo,
        url="https://media.example.com/a.mp3?" + query,
    )
    payload["originator"]["number"].update(number=number, anonymous=anonymous)
    record = norm(payload)
    row = record.recording
    assert row["created_at"] == created and row["updated_at"] == updated
    assert row["created_month"] == created.strftime("%Y-%m")
    assert row["duration"] == (None if duration is None else float(duration))
    assert row["stereo"] is stereo and row["status"] == status == record.status
    assert row["url"] == "https://media.example.com/a.mp3"
    assert "?" + query not in row["raw_json"]
    originator = record.parties[0]
    assert originator["number"] == number and originator["number_anonymous"] == anonymous
    assert json.loads(row["raw_json"])["status"] == status


def test_signed_urls_are_stripped_whatever_the_field_is_called() -> None:
    payload = make_payload(
        links={"download": "https://s3.example/a.mp3?X-Amz-Signature=S2"},
        mediaUrls=["https://s3.example/b.mp3?X-Amz-Signature=S3", "plain text"],
        recordingUri="https://s3.example/c.mp3?X-Amz-Signature=S4",
        mirrors=[{"href": "https://user:pw@s3.example/d.mp3#frag"}],
    )
    record = norm(payload)
    rendered = json.dumps(record.redacted_payload) + record.recording["raw_json"]
    for secret in ("S2", "S3", "S4", "user:pw", "frag"):
        assert secret not in rendered
    assert record.redacted_payload["links"]["download"] == "https://s3.example/a.mp3"
    assert record.redacted_payload["mediaUrls"][1] == "plain text"
