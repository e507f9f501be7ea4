"""What the Parquet dataset shows of callers: raw values, keyed hashes, or nulls.

``RECARCHIVE_PARQUET_PII`` (docs/compliance.md, "Privacy-aware analyst data"):

* ``raw``: the values as SQL holds them (the default, and the only mode before issue 14);
* ``hash``: each value replaced by the hex HMAC-SHA-256 of its UTF-8 bytes, keyed with
  ``RECARCHIVE_PII_KEY``: the same value gives the same 64 hex characters in every column,
  partition and table, so analysts can count and join callers without reading a number;
* ``drop``: nulls, with the Arrow schema unchanged.

Only the columns of :data:`PII_COLUMNS` change; SQL keeps the raw values for the operator.

A file records the policy it was written under in its Parquet key-value metadata
(:data:`METADATA_KEY`, see :attr:`PiiPolicy.tag`), so an export can tell which partitions a
change of mode or key has left behind. For ``hash`` the tag names the key by a key id, the
HMAC of a fixed label under the key: anyone holding one (value, hash) pair from the dataset can
already test a guessed key, so the key id gives no new way in, and HMAC-SHA-256 being a
pseudo-random function, its output says nothing else about the key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc

from recarchive.config import ParquetPii, Settings
from recarchive.errors import ConfigError
from recarchive.model import PARTY_ROLES

__all__ = [
    "METADATA_KEY",
    "PII_COLUMNS",
    "PII_PARTY_FIELDS",
    "RAW",
    "PiiPolicy",
    "pseudonym",
]

#: The party columns that identify a caller: the contact's identifier value (a phone number or
#: an e-mail address), the phone number, its caller-ID name and its identity (``sip:…``).
#: ``contact_id`` stays: it is Bird's random UUID of the contact, not readable as a person.
PII_PARTY_FIELDS: Final[tuple[str, ...]] = (
    "contact_identifier_value",
    "number",
    "number_caller_id_name",
    "number_identity",
)

#: Per table, the columns :class:`PiiPolicy` rewrites (all strings).
PII_COLUMNS: Final[dict[str, tuple[str, ...]]] = {
    "recordings": tuple(f"{role}_{name}" for role in PARTY_ROLES for name in PII_PARTY_FIELDS),
    "recording_parties": PII_PARTY_FIELDS,
}

#: The Parquet key-value metadata key holding :attr:`PiiPolicy.tag` (absent in ``raw`` files,
#: so files written before the setting existed count as ``raw`` and are not rewritten).
METADATA_KEY: Final = "recarchive.pii"

#: What the key id is the HMAC of: fixed, public, and no phone number or name.
_KEY_ID_LABEL: Final = b"recarchive parquet pii key id v1"
#: Hex characters of the key id kept in the tag: 64 bits tell keys apart.
_KEY_ID_CHARS: Final = 16
_DIGEST: Final = "sha256"


#: ``bytes.translate`` tables XOR-ing every byte with HMAC's inner and outer pad (RFC 2104).
_INNER_PAD: Final = bytes(byte ^ 0x36 for byte in range(256))
_OUTER_PAD: Final = bytes(byte ^ 0x5C for byte in range(256))


def pseudonym(key: bytes, value: str) -> str:
    """The hex HMAC-SHA-256 of ``value``'s UTF-8 bytes under ``key``: 64 lowercase characters.

    Args:
        key: The PII key's bytes.
        value: A phone number, identifier, identity or name.

    Returns:
        What ``hash`` mode writes instead of ``value``.
    """
    return hmac.digest(key, value.encode("utf-8"), _DIGEST).hex()


def _hasher(key: bytes) -> Callable[[str], str]:
    """:func:`pseudonym` under ``key``, three times faster on many values.

    The same HMAC-SHA-256 (RFC 2104), with the hash states of the padded key made once:
    ``hmac.digest`` sets up the key (and, with OpenSSL 3, looks the digest up) on every call,
    which cost 9.5 µs a value against 3.0 µs here (10,000 numbers, this machine).
    ``tests/test_parquet_pii.py`` checks it against :func:`pseudonym` for generated keys.
    """
    block = hashlib.sha256().block_size
    if len(key) > block:
        key = hashlib.sha256(key).digest()
    key = key.ljust(block, b"\0")
    inner_start = hashlib.sha256(key.translate(_INNER_PAD))
    outer_start = hashlib.sha256(key.translate(_OUTER_PAD))

    def hashed(value: str) -> str:
        inner = inner_start.copy()
        inner.update(value.encode("utf-8"))
        outer = outer_start.copy()
        outer.update(inner.digest())
        return outer.hexdigest()

    return hashed


class PiiPolicy:
    """How the export writes the :data:`PII_COLUMNS` of each batch, and the tag of its files.

    The key is held privately and shown by no ``repr``; build one with :meth:`from_settings`.

    Args:
        mode: ``raw``, ``hash`` or ``drop``.
        key: The PII key (``hash`` only; required there).

    Raises:
        ConfigError: ``hash`` without a key (settings check this first, naming the variables).
    """

    __slots__ = ("_hash", "_key", "mode")

    def __init__(self, mode: ParquetPii = "raw", key: bytes | None = None) -> None:
        if mode == "hash" and not key:
            raise ConfigError("RECARCHIVE_PARQUET_PII=hash needs RECARCHIVE_PII_KEY")
        self.mode: ParquetPii = mode
        self._key = key if mode == "hash" else None
        self._hash = _hasher(key) if key and mode == "hash" else None

    @classmethod
    def from_settings(cls, settings: Settings) -> PiiPolicy:
        """The policy of ``RECARCHIVE_PARQUET_PII`` and ``RECARCHIVE_PII_KEY``."""
        key = settings.pii_key.get_secret_value().encode("utf-8") if settings.pii_key else None
        return cls(settings.parquet_pii, key)

    def __repr__(self) -> str:
        return f"PiiPolicy(mode={self.mode!r})"

    @property
    def tag(self) -> str | None:
        """The value of :data:`METADATA_KEY` in files written under this policy.

        ``None`` for ``raw`` (no metadata: today's files), ``drop``, or
        ``hash:hmac-sha256:<key id>`` (see the module docstring for why the key id is safe).
        """
        if self._key is None:
            return None if self.mode == "raw" else self.mode
        key_id = hmac.digest(self._key, _KEY_ID_LABEL, _DIGEST).hex()[:_KEY_ID_CHARS]
        return f"hash:hmac-{_DIGEST}:{key_id}"

    def batch(self, table: str, batch: pa.RecordBatch) -> pa.RecordBatch:
        """``batch`` of ``table`` with its PII columns hashed or nulled (``raw``: as is)."""
        if self.mode == "raw":
            return batch
        indexes = [batch.schema.get_field_index(name) for name in PII_COLUMNS[table]]
        columns = list(batch.columns)
        rows = batch.num_rows
        if self._key is None:  # drop
            for index in indexes:
                columns[index] = pa.nulls(rows, batch.schema.field(index).type)
        else:
            # Every PII column of the batch at once: a value repeated in several columns (a
            # number that is also the contact's identifier) or rows is hashed once.
            hashed = self._hashed(pa.concat_arrays([columns[index] for index in indexes]))
            for position, index in enumerate(indexes):
                columns[index] = hashed.slice(position * rows, rows)
        return pa.RecordBatch.from_arrays(columns, schema=batch.schema)

    def _hashed(self, values: pa.Array) -> pa.Array:
        """``values`` (strings) with each distinct value replaced by its pseudonym once.

        Dictionary-encoded, so the HMAC runs per distinct value, not per row; the nulls stay
        nulls (their indices are null, and ``take`` of a null index is null).
        """
        assert self._hash is not None
        encoded = pc.dictionary_encode(values)
        digests = [self._hash(value) for value in encoded.dictionary.to_pylist()]
        return pc.take(pa.array(digests, type=values.type), encoded.indices)


#: Today's behaviour: every value as SQL holds it.
RAW: Final = PiiPolicy()
