"""Hard limits on what one answer may cost: size, JSON depth, and download speed.

A misbehaving server (or a proxy in front of Bird) must never make one recording cost
unbounded memory, stack or time. Metadata answers are read as a stream and refused past
:attr:`AnswerLimits.metadata_max_bytes` before they are parsed; parsed JSON deeper than
:attr:`AnswerLimits.json_max_depth` is refused (Python's parser would otherwise recurse into
a ``RecursionError``); a media download is aborted past :attr:`AnswerLimits.media_max_bytes`
or when it runs slower than curl's ``--speed-limit`` over ``--speed-time``.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from recarchive.errors import PayloadError, TransportError

GiB = 1024**3
MiB = 1024**2
#: Bird's payloads nest four levels deep; anything past this is not a recording.
DEFAULT_JSON_MAX_DEPTH = 64
# Escaped surrogates ("\ud800"): the only way a lone surrogate gets into parsed JSON.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


@dataclass(frozen=True)
class AnswerLimits:
    """Limits of one process's Bird answers (settings ``RECARCHIVE_MEDIA_*`` / ``METADATA_*``).

    Attributes:
        metadata_max_bytes: A metadata or list answer larger than this is refused unparsed.
        media_max_bytes: A media download larger than this is aborted.
        low_speed_bytes: Minimum average download speed, bytes per second ...
        low_speed_seconds: ... over any window this long; slower downloads are aborted.
        json_max_depth: Deepest nesting of arrays and objects accepted in a JSON answer.
        allowed_hosts: Media hosts allowed on private, loopback or link-local addresses.
        answer_seconds: Longest an API answer may take, headers and body, and the media
            host's headers (a read timeout restarts with every byte; this does not).
        transcription_max_bytes: A transcription's content (one format) larger than this is
            refused; list answers of transcriptions are bound by ``metadata_max_bytes``.
        body_limit_name: What refusal messages name as the limit of an answer's body.
    """

    metadata_max_bytes: int = 4 * MiB
    media_max_bytes: int = 4 * GiB
    low_speed_bytes: int = 1024
    low_speed_seconds: float = 60.0
    json_max_depth: int = DEFAULT_JSON_MAX_DEPTH
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    answer_seconds: float = 300.0
    transcription_max_bytes: int = 16 * MiB
    body_limit_name: str = "RECARCHIVE_METADATA_MAX_BYTES"


#: zlib ``wbits`` per ``Content-Encoding`` we decode ourselves (a bounded decompression).
_DECODERS = {"gzip": (31,), "x-gzip": (31,), "deflate": (15, -15)}


def decode_body(
    raw: bytes,
    encoding: str | None,
    *,
    limit: int,
    what: str,
    limit_name: str = "RECARCHIVE_METADATA_MAX_BYTES",
) -> bytes:
    """Undo one ``Content-Encoding`` of a metadata answer, never past ``limit`` bytes.

    httpx's own decoding inflates each piece whole before any size check (a 3 KB answer
    compressed twice costs gigabytes), and never checks that the stream ended. Here the
    compressed bytes were already counted against the limit, one encoding at most is
    undone, the output is capped at ``limit``, and a stream that does not end is refused.

    Raises:
        PayloadError: Unknown or stacked encodings, a bomb, a cut or corrupt stream.
    """
    coding = (encoding or "identity").strip().lower()
    if coding in ("", "identity"):
        return raw
    if coding not in _DECODERS:
        raise PayloadError(f"{what}: unsupported Content-Encoding {coding[:40]!r}", field="<body>")
    for wbits in _DECODERS[coding]:
        decoder = zlib.decompressobj(wbits)
        try:
            out = decoder.decompress(raw, limit + 1)
        except zlib.error:
            continue
        if len(out) > limit or decoder.unconsumed_tail:
            raise PayloadError(
                f"{what}: answer inflates beyond {limit} bytes ({limit_name}); refused",
                field="<body>",
            )
        if not decoder.eof:
            raise PayloadError(f"{what}: compressed answer ends early", field="<body>")
        return out
    raise PayloadError(f"{what}: corrupt {coding} answer", field="<body>")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json_object(data: bytes, what: str, *, max_depth: int) -> dict[str, Any]:
    """Parse a JSON object, refusing anything a recording payload cannot be.

    Refused: invalid UTF-8 or JSON, ``NaN``/``Infinity``, integers too long to convert,
    nesting deeper than ``max_depth`` (checked without recursion), lone surrogates, and
    anything but an object at the top.

    Raises:
        PayloadError: With ``field="<body>"`` and the reason.
    """
    try:
        # Strict UTF-8 first: json.loads(bytes) decodes with "surrogatepass", letting an
        # encoded lone surrogate through into text no database or encoder accepts.
        body = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError as exc:
        raise PayloadError(f"{what}: answer nests deeper than {max_depth}", field="<body>") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise PayloadError(f"{what}: answer is not JSON", field="<body>") from exc
    if not isinstance(body, dict):
        raise PayloadError(f"{what}: answer is not a JSON object", field="<body>")
    check_text = bool(_SURROGATE_ESCAPE.search(data))
    # Each level of nesting opens with a bracket of its own: a body with no more brackets in
    # all (strings' included) than max_depth cannot nest deeper, and needs no walk (a
    # recording's payload has about ten; the walk cost ~1 % of a metadata run's CPU).
    if check_text or data.count(b"{") + data.count(b"[") > max_depth:
        _check_shape(body, what, max_depth, check_text=check_text)
    return body


def _check_shape(body: dict[str, Any], what: str, max_depth: int, *, check_text: bool) -> None:
    """Depth (and, when escapes were seen, text) of parsed JSON, with an explicit stack."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            raise PayloadError(f"{what}: answer nests deeper than {max_depth}", field="<body>")
        items = value.values() if isinstance(value, dict) else value
        if check_text and isinstance(value, dict):
            items = [*value.keys(), *value.values()]
        for item in items:
            if isinstance(item, dict | list):
                stack.append((item, depth + 1))
            elif check_text and isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise PayloadError(
                        f"{what}: answer holds a lone surrogate", field="<body>"
                    ) from exc


class LowSpeedWatch:
    """curl's ``--speed-limit``/``--speed-time``: abort when a window is too slow.

    Each window of ``seconds`` must bring at least ``bytes_per_second * seconds`` bytes; the
    check runs whenever bytes arrive (a body that stops entirely is the read timeout's job).

    Args:
        bytes_per_second: The slowest acceptable average.
        seconds: Window length.
        what: Names the download in the error.
        clock: Monotonic clock (injected by tests).
    """

    def __init__(
        self,
        bytes_per_second: int,
        seconds: float,
        what: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bytes_per_second = bytes_per_second
        self.seconds = seconds
        self.what = what
        self._clock = clock
        self._window_start = clock()
        self._window_bytes = 0

    def add(self, count: int) -> None:
        """Count ``count`` new bytes.

        Raises:
            TransportError: The window that just ended was slower than the limit.
        """
        self._window_bytes += count
        now = self._clock()
        elapsed = now - self._window_start
        if elapsed < self.seconds:
            return
        if self._window_bytes < self.bytes_per_second * elapsed:
            raise TransportError(
                f"{self.what}: slower than {self.bytes_per_second} bytes/s for "
                f"{elapsed:.0f}s ({self._window_bytes} bytes); aborted"
            )
        self._window_start, self._window_bytes = now, 0
