"""How a media body's end and content are confirmed independently of the connection.

A body without ``Content-Length`` (and without chunked framing) ends when the connection
closes, and a connection that closes early looks exactly like a complete body to every HTTP
client (docs/reliability.md, "The media path"). Such a body is accepted only when a
checksum the media host sent confirms it. :class:`BodyCheck` reads the answer's headers
once, computes the digests it needs while the body streams, and says at the end whether the
body is confirmed:

* by framing: ``Content-Length`` (checked against the bytes read) or complete chunked
  transfer coding (the HTTP parser refuses a chunked body cut short);
* by content: ``Content-MD5``, ``x-amz-checksum-sha256`` / ``-sha1`` / ``-crc32``, or — only
  when the framing is missing — an ``ETag`` that is a plain MD5 (single-part S3 objects
  without SSE-KMS; a mismatch there is never taken as corruption of a framed body, because
  such an ETag is not always an MD5).

A present checksum that does not match refuses the body whatever its framing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from recarchive.errors import MediaIntegrityError

_PLAIN_MD5_ETAG = re.compile(r'^"?([0-9a-fA-F]{32})"?$')
_DIGITS = re.compile(r"^[0-9]{1,19}$")
_COMPOSITE = re.compile(r"-[0-9]+\s*$")


def _crc32() -> Any:
    return _Crc32()


class _Crc32:
    """zlib.crc32 with hashlib's update/digest interface."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes) -> None:
        self.value = zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


# header -> (name shown in messages, digest factory). Values are base64 of the raw digest.
_CHECKSUM_HEADERS: dict[str, tuple[str, Callable[[], Any]]] = {
    "content-md5": ("Content-MD5", hashlib.md5),
    "x-amz-checksum-sha256": ("x-amz-checksum-sha256", hashlib.sha256),
    "x-amz-checksum-sha1": ("x-amz-checksum-sha1", hashlib.sha1),
    "x-amz-checksum-crc32": ("x-amz-checksum-crc32", _crc32),
}


def plain_md5_etag(value: str | None) -> str | None:
    """The lower-case hex MD5 an ``ETag`` holds when it is a plain one, else ``None``.

    Plain: a single-part S3 object without SSE-KMS; ``"…-N"`` (multipart) and weak tags are not.
    """
    match = _PLAIN_MD5_ETAG.match((value or "").strip())
    return match.group(1).lower() if match else None


def parse_content_length(headers: Mapping[str, str], what: str) -> int | None:
    """Return ``Content-Length`` as a number, ``None`` when absent.

    Raises:
        MediaIntegrityError: The header is present but not one non-negative number (or
            repeated with different values): the answer's framing cannot be trusted.
    """
    raw = headers.get("content-length")
    if raw is None:
        return None
    values = {part.strip() for part in raw.split(",")}
    if len(values) != 1 or not _DIGITS.match(next(iter(values))):
        raise MediaIntegrityError(f"{what}: malformed Content-Length header")
    return int(next(iter(values)))


@dataclass
class _Expected:
    name: str
    digest: Any
    want: bytes


class BodyCheck:
    """The independent checks of one media answer, fed with its body as it streams.

    Args:
        headers: The answer's headers (case-insensitive mapping).
        what: Names the download in errors.

    Raises:
        MediaIntegrityError: A malformed ``Content-Length`` or checksum header.
    """

    def __init__(self, headers: Mapping[str, str], what: str) -> None:
        self.what = what
        self.content_length = parse_content_length(headers, what)
        coding = headers.get("transfer-encoding", "").lower()
        self.chunked = self.content_length is None and coding.rsplit(",", 1)[-1].strip() == (
            "chunked"
        )
        self._expected: list[_Expected] = []
        for header, (name, factory) in _CHECKSUM_HEADERS.items():
            value = headers.get(header)
            if value is None or _COMPOSITE.search(value):
                # Absent, or a checksum of parts ("...=-3", multipart): not of the whole body.
                continue
            try:
                want = base64.b64decode(value.strip(), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise MediaIntegrityError(f"{what}: malformed {name} header") from exc
            self._expected.append(_Expected(name, factory(), want))
        self.etag_md5 = plain_md5_etag(headers.get("etag"))
        self._etag_digest: Any = None
        if self.content_length is None and not self.chunked and self.etag_md5:
            self._etag_digest = hashlib.md5()  # noqa: S324 - an integrity check, not security

    @property
    def framed(self) -> bool:
        """True when the HTTP framing itself marks the body's end."""
        return self.content_length is not None or self.chunked

    def update(self, chunk: bytes) -> None:
        """Feed the next piece of the body."""
        for expected in self._expected:
            expected.digest.update(chunk)
        if self._etag_digest is not None:
            self._etag_digest.update(chunk)

    def finish(self, size: int) -> str:
        """Check the whole body of ``size`` bytes; return what confirmed its end.

        Returns:
            ``"content-length"``, ``"chunked"``, or the checksum that confirmed an unframed
            body (e.g. ``"etag-md5"``, ``"x-amz-checksum-sha256"``).

        Raises:
            MediaIntegrityError: A length or checksum mismatch, or an unframed body that no
                checksum confirms (its end was marked only by the connection closing).
        """
        if self.content_length is not None and size != self.content_length:
            raise MediaIntegrityError(
                f"{self.what}: got {size} bytes, Content-Length said {self.content_length}"
            )
        for expected in self._expected:
            if expected.digest.digest() != expected.want:
                raise MediaIntegrityError(
                    f"{self.what}: {expected.name} does not match the {size} bytes received"
                )
        if self.content_length is not None:
            return "content-length"
        if self.chunked:
            return "chunked"
        if self._expected:
            return self._expected[0].name.lower()
        if self._etag_digest is not None:
            if self._etag_digest.hexdigest() != self.etag_md5:
                raise MediaIntegrityError(
                    f"{self.what}: no Content-Length, and the ETag (an MD5) does not match the "
                    f"{size} bytes received: the connection may have closed early"
                )
            return "etag-md5"
        raise MediaIntegrityError(
            f"{self.what}: no Content-Length and no checksum: {size} bytes ended by the "
            "connection closing cannot be told from a cut-off download"
        )
