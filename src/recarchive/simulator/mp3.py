"""Deterministic MP3 bytes: an optional ID3v2 tag followed by MPEG-1 Layer III frames.

Real decoders (and our frame-sync check) accept the output; the audio content is noise. Bytes
are produced in blocks, so a 500 MB recording is streamed without ever being held in memory.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator

#: MPEG-1 Layer III, no CRC, 128 kbit/s, 44.1 kHz, no padding, joint stereo.
FRAME_HEADER = bytes([0xFF, 0xFB, 0x90, 0x44])
#: 144 * 128000 / 44100, rounded down (no padding bit).
FRAME_SIZE = 417
FRAMES_PER_BLOCK = 64


def _id3_tag(title: str) -> bytes:
    """Return a minimal ID3v2.3 tag with one ``TIT2`` (title) frame."""
    text = b"\x00" + title.encode("latin-1", "replace")
    frame = b"TIT2" + len(text).to_bytes(4, "big") + b"\x00\x00" + text
    size = len(frame)
    # ID3 sizes are "synchsafe": 7 bits per byte.
    synchsafe = bytes([(size >> 21) & 0x7F, (size >> 14) & 0x7F, (size >> 7) & 0x7F, size & 0x7F])
    return b"ID3\x03\x00\x00" + synchsafe + frame


class Mp3Source:
    """The bytes of one simulated recording.

    Args:
        key: Stable identity of the recording (its ID); seeds the frame contents.
        size: Total size in bytes (at least one frame header is always present).
        with_id3: Start with an ID3v2 tag, as many real files do.
    """

    def __init__(self, key: str, size: int, *, with_id3: bool) -> None:
        self.size = size
        rng = random.Random(key)
        frame = FRAME_HEADER + rng.randbytes(FRAME_SIZE - len(FRAME_HEADER))
        self._head = _id3_tag(f"recording {key}") if with_id3 else b""
        # One block of frames, varied per frame so blocks do not compress to nothing.
        frames = bytearray()
        for index in range(FRAMES_PER_BLOCK):
            frames += frame[:4] + bytes([index]) + frame[5:]
        self._block = bytes(frames)

    def iter_chunks(
        self, chunk_size: int = 256 * 1024, limit: int | None = None
    ) -> Iterator[bytes]:
        """Yield the bytes in chunks of about ``chunk_size``, stopping after ``limit`` bytes."""
        remaining = self.size if limit is None else min(limit, self.size)
        head = self._head[:remaining]
        if head:
            yield head
            remaining -= len(head)
        repeat = max(1, chunk_size // len(self._block))
        chunk = self._block * repeat
        while remaining > 0:
            piece = chunk[:remaining]
            remaining -= len(piece)
            yield piece

    def read_all(self) -> bytes:
        """Return every byte (tests only; large recordings should be streamed)."""
        return b"".join(self.iter_chunks())

    def sha256(self) -> str:
        """Return the hex SHA-256 of the bytes, computed by streaming."""
        digest = hashlib.sha256()
        for chunk in self.iter_chunks(1024 * 1024):
            digest.update(chunk)
        return digest.hexdigest()
