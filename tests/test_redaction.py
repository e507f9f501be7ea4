"""The one redaction function, and every sink it guards: log records, exception text, payloads."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recarchive.bird.integrity import BodyCheck
from recarchive.bird.limits import LowSpeedWatch, parse_json_object
from recarchive.errors import MediaIntegrityError, PayloadError, TransportError
from recarchive.normalize import redact_payload
from recarchive.redaction import describe, install_log_redaction, redact, register_secret

SIG = "0123456789abcdefSIG"

REDACT_CASES = [
    # (id, text, must not contain, must contain)
    ("presigned-url", f"https://b.s3.amazonaws.com/k.mp3?X-Amz-Signature={SIG}", SIG, "k.mp3"),
    ("url-inside-text", f" see https://b.s3/k?X-Amz-Signature={SIG} now", SIG, " now"),
    ("url-in-quotes", f"GET 'https://h/x?sig={SIG}' failed", SIG, "https://h/x'"),
    ("userinfo", "https://admin:hunter2@db.example:5432/x", "hunter2", "db.example:5432"),
    ("userinfo-no-query", "postgresql://app:hunter2@127.0.0.1/db", "hunter2", "127.0.0.1/db"),
    ("fragment", f"https://h/x#token={SIG}", SIG, "https://h/x"),
    ("bare-param", f"query X-Amz-Signature={SIG}&X-Amz-Date=1", SIG, "X-Amz-Date=1"),
    ("bare-credential", f"X-Amz-Credential={SIG}/20261201", SIG, "X-Amz-Credential=***"),
    ("password-param", f"sslpassword={SIG}", SIG, "sslpassword=***"),
    ("authorization-header", f"Authorization: AccessKey {SIG}", SIG, "Authorization: ***"),
    ("authorization-dict", f"{{'authorization': 'Bearer {SIG}'}}", SIG, "authorization"),
    ("broken-ipv6-url", f"https://u:hunter2@[bad/x?sig={SIG}", "hunter2", "https://"),
    ("plain-text-kept", "nothing to see: 5 recordings", "\0", "nothing to see: 5 recordings"),
]


@pytest.mark.parametrize(
    ("text", "hidden", "kept"),
    [case[1:] for case in REDACT_CASES],
    ids=[case[0] for case in REDACT_CASES],
)
def test_redact(text: str, hidden: str, kept: str) -> None:
    out = redact(text)
    assert hidden not in out
    assert kept in out


def test_registered_secrets_are_masked_anywhere() -> None:
    register_secret("AK-registered-secret-42")
    register_secret("ab")  # too short to mask safely: ignored
    assert redact("key AK-registered-secret-42 refused; ab") == "key *** refused; ab"


def test_describe_redacts_exception_text() -> None:
    exc = ValueError(f"bad URL https://h/x?X-Amz-Signature={SIG}")
    assert describe(exc) == "ValueError: bad URL https://h/x"
    assert describe(KeyError()) == "KeyError"


def test_log_records_and_tracebacks_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    install_log_redaction()
    install_log_redaction()  # idempotent
    logger = logging.getLogger("some.library")
    try:
        try:
            raise ConnectionError(f"GET https://h/m.mp3?X-Amz-Signature={SIG} reset")
        except ConnectionError as inner:
            raise RuntimeError("download failed") from inner
    except RuntimeError:
        logger.exception("while fetching %s", f"https://h/m.mp3?X-Amz-Signature={SIG}")
    assert "download failed" in caplog.text and "ConnectionError" in caplog.text
    assert SIG not in caplog.text
    assert all(SIG not in (record.exc_text or "") for record in caplog.records)


def test_payload_strings_are_redacted_at_any_depth() -> None:
    payload = {
        "url": f"https://b.s3/k.mp3?X-Amz-Signature={SIG}",
        "note": f"call back https://x.example/cb?sig={SIG} please",
        "links": [{"download": f"https://u:hunter2@media/x?{SIG}"}],
    }
    text = repr(redact_payload(payload))
    assert SIG not in text and "hunter2" not in text
    assert "please" in text


CHECK_CASES = [
    # (id, headers, body, size, confirmed_by or the error's text)
    ("length-ok", {"content-length": "3"}, b"abc", 3, "content-length"),
    ("length-short", {"content-length": "4"}, b"abc", 3, "Content-Length said 4"),
    ("length-repeated-same", {"content-length": "3, 3"}, b"abc", 3, "content-length"),
    ("length-repeated-differs", {"content-length": "3, 4"}, b"abc", 3, "malformed"),
    ("length-negative", {"content-length": "-3"}, b"abc", 3, "malformed"),
    ("length-hex", {"content-length": "0x3"}, b"abc", 3, "malformed"),
    ("chunked", {"transfer-encoding": "chunked"}, b"abc", 3, "chunked"),
    ("gzip-then-chunked", {"transfer-encoding": "gzip, chunked"}, b"abc", 3, "chunked"),
    ("nothing", {}, b"abc", 3, "no Content-Length and no checksum"),
    ("etag-md5", {"etag": '"900150983cd24fb0d6963f7d28e17f72"'}, b"abc", 3, "etag-md5"),
    ("etag-md5-wrong", {"etag": '"00000000000000000000000000000000"'}, b"abc", 3, "ETag"),
    ("etag-multipart", {"etag": '"900150983cd24fb0d6963f7d28e17f72-2"'}, b"abc", 3, "no check"),
    ("etag-weak", {"etag": 'W/"900150983cd24fb0d6963f7d28e17f72"'}, b"abc", 3, "no check"),
    ("content-md5", {"content-md5": "kAFQmDzST7DWlj99KOF/cg=="}, b"abc", 3, "content-md5"),
    (
        "crc32",
        {"x-amz-checksum-crc32": "NSRBwg==", "content-length": "3"},
        b"abc",
        3,
        "content-length",
    ),
    ("crc32-wrong", {"x-amz-checksum-crc32": "AAAAAA=="}, b"abc", 3, "crc32 does not match"),
    ("sha1-malformed", {"x-amz-checksum-sha1": "not base64!"}, b"abc", 3, "malformed"),
]


@pytest.mark.parametrize(
    ("headers", "body", "size", "expected"),
    [case[1:] for case in CHECK_CASES],
    ids=[case[0] for case in CHECK_CASES],
)
def test_body_check(headers: dict[str, str], body: bytes, size: int, expected: str) -> None:
    import httpx

    def run() -> str:
        check = BodyCheck(httpx.Headers(headers), "media of r")
        check.update(body)
        return check.finish(size)

    if expected in {"content-length", "chunked", "etag-md5", "content-md5"}:
        assert run() == expected
    else:
        with pytest.raises(MediaIntegrityError) as caught:
            run()
        assert expected in str(caught.value) or expected == "no check"


def test_low_speed_watch_aborts_a_slow_window_and_passes_a_fast_one() -> None:
    now = [0.0]
    watch = LowSpeedWatch(1000, 10, "media of r", clock=lambda: now[0])
    for _ in range(10):  # 2,000 bytes/s for 10 s: fine
        now[0] += 1
        watch.add(2000)
    now[0] += 10  # then 10 s for 5,000 bytes: 500 bytes/s
    with pytest.raises(TransportError, match="slower than 1000 bytes/s"):
        watch.add(5000)


JSON_CASES = [
    ("array", b"[1]", "not a JSON object"),
    ("deep", b'{"a":' + b"[" * 100 + b"]" * 100 + b"}", "nests deeper than 64"),
    ("very-deep", b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests deeper"),
    ("deep-objects", b'{"a":' * 70 + b"1" + b"}" * 70, "nests deeper than 64"),
    ("nan", b'{"a": NaN}', "not JSON"),
    ("infinity", b'{"a": -Infinity}', "not JSON"),
    ("long-int", b'{"a": 1' + b"0" * 5000 + b"}", "not JSON"),
    ("bad-utf8", b'{"a": "\xff"}', "not JSON"),
    ("lone-surrogate-value", b'{"a": "\\udc00"}', "lone surrogate"),
    ("lone-surrogate-key", b'{"\\ud800": 1}', "lone surrogate"),
    ("truncated", b'{"a": ', "not JSON"),
]


@pytest.mark.parametrize(
    ("data", "message"), [case[1:] for case in JSON_CASES], ids=[case[0] for case in JSON_CASES]
)
def test_json_answers_that_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        parse_json_object(data, "recording r", max_depth=64)


_NESTED: st.SearchStrategy[object] = st.recursive(
    st.none() | st.integers(-5, 5) | st.text(alphabet='{}[]a"', max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner, max_size=3)
    ),
    max_leaves=40,
)


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(item) for item in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(item) for item in value), default=0)
    return 0


@given(value=_NESTED, max_depth=st.integers(1, 12), wrap=st.integers(0, 12))
def test_the_depth_limit_holds_with_or_without_the_walk(
    value: object, max_depth: int, wrap: int
) -> None:
    """The walk is skipped when the body has no more brackets than the limit: generated
    bodies (brackets inside strings too) are refused exactly when they nest too deep."""
    body = {"a": value}
    for _ in range(wrap):
        body = {"a": [body]}
    data = json.dumps(body).encode()
    if _depth(body) > max_depth:
        with pytest.raises(PayloadError, match="nests deeper"):
            parse_json_object(data, "x", max_depth=max_depth)
    else:
        assert parse_json_object(data, "x", max_depth=max_depth) == body


def test_a_surrogate_pair_is_fine() -> None:
    assert parse_json_object(b'{"a": "\\ud83d\\ude00"}', "r", max_depth=64) == {"a": "\U0001f600"}
