"""``RECARCHIVE_PARQUET_PII``: callers' columns raw, hashed or null in Parquet, never in doubt.

End to end through the CLI, on the simulator's dataset (its numbers, identities, contact
identifiers and caller-ID names), a SQLite store and a local Parquet root.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import string
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from sqlalchemy import select
from typer.testing import CliRunner, Result

from recarchive.cli.app import app
from recarchive.config import MIN_PII_KEY_LENGTH, Settings
from recarchive.errors import ConfigError
from recarchive.export.parquet import export_changed
from recarchive.export.pii import METADATA_KEY, PII_COLUMNS, PiiPolicy, pseudonym
from recarchive.export.schema import PARTIES_SCHEMA, TABLE_SCHEMAS
from recarchive.simulator.server import SimulatorServer
from recarchive.store.engine import create_engine_for
from recarchive.store.tables import recording_parties
from tests.fixtures.simulator import SimulatorFactory

KEY = "pii-test-key-5f0c1e7d9a3b44c6b2e8-0d7a91f3"
OTHER_KEY = "pii-test-key-other-0000-1111-2222-3333"
SHORT_KEY = "pii-test-key-31-characters-long"
HEX = set(string.hexdigits.lower())

Invoke = Callable[..., Result]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RECARCHIVE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def sim(simulator_factory: SimulatorFactory) -> SimulatorServer:
    """60 recordings over six months; one caller (number, name, identity) in three months."""
    server = simulator_factory(recordings=60, seed=14)
    dataset = server.dataset
    months: dict[str, str] = {}
    for recording_id in dataset.ids:
        payload = dataset.payload(recording_id)
        assert payload is not None
        months.setdefault(payload["createdAt"][:7], recording_id)
    assert len(months) >= 3
    for recording_id in list(months.values())[:3]:
        dataset.touch(recording_id, originator=_repeat_caller())
    return server


def _repeat_caller() -> dict[str, Any]:
    return {
        "contact": {
            "id": "0b7e0c2a-3c55-4a5e-9d55-6f5d2b4a1f00",
            "identifierKey": "phonenumber",
            "identifierValue": REPEAT_NUMBER,
        },
        "number": {
            "type": "sip",
            "number": REPEAT_NUMBER,
            "anonymous": False,
            "callerIdName": "Repeat Caller",
            "identity": f"sip:{REPEAT_NUMBER[1:]}@example.com",
            "countryIsoCode": "NL",
        },
    }


REPEAT_NUMBER = "+31612340014"


@pytest.fixture
def env(tmp_path: Path, sim: SimulatorServer) -> dict[str, str]:
    return {
        "RECARCHIVE_DATABASE_URL": f"sqlite:///{tmp_path / 'archive.db'}",
        "RECARCHIVE_PARQUET_ROOT": str(tmp_path / "parquet"),
        "RECARCHIVE_REQUESTS_PER_SECOND": "1000",
        "RECARCHIVE_BIRD_API_URL": sim.api_url,
        "RECARCHIVE_BIRD_ACCESS_KEY": sim.config.access_key,
        "RECARCHIVE_WORKSPACE_ID": sim.config.workspace_id,
    }


@pytest.fixture
def invoke(env: dict[str, str]) -> Invoke:
    def run(*args: str, pii: str | None = None, key: str | None = None) -> Result:
        extra = {"RECARCHIVE_PARQUET_PII": pii} if pii else {}
        if key is not None:
            extra["RECARCHIVE_PII_KEY"] = key
        return CliRunner().invoke(app, list(args), env={**env, **extra}, catch_exceptions=False)

    return run


def archive(invoke: Invoke, sim: SimulatorServer, pii: str, key: str | None = KEY) -> None:
    result = invoke("archive", "--skip-media", *sim.dataset.ids, pii=pii, key=key)
    assert result.exit_code == 0, result.output


def pii_values(sim: SimulatorServer) -> set[str]:
    """Every phone number, contact identifier value, identity and caller-ID name of the data."""
    found: set[str | None] = set()
    for recording_id in sim.dataset.ids:
        payload = sim.dataset.payload(recording_id)
        assert payload is not None
        for role in ("originator", "receiver"):
            party = payload.get(role) or {}
            found.add((party.get("contact") or {}).get("identifierValue"))
            number = party.get("number") or {}
            found.update(number.get(name) for name in ("number", "callerIdName", "identity"))
    return {value for value in found if value is not None}


def long_values(values: set[str]) -> set[str]:
    """Values a byte scan can look for without chance hits: numbers, identities, digit runs."""
    found = {value for value in values if len(value) >= 9}
    found |= {value.removeprefix("+31") for value in found if value.startswith("+31")}
    return found


def files(root: Path) -> list[Path]:
    paths = sorted(root.rglob("*.parquet"))
    assert paths
    return paths


def strings(path: Path) -> Iterator[str]:
    """Every decoded string value of a Parquet file."""
    table = pq.read_table(path)
    for column in table.columns:
        if pa.types.is_string(column.type):
            yield from (value for value in column.to_pylist() if value is not None)


def metadata_bytes(path: Path) -> bytes:
    """The file's key-value metadata, keys and values, the Arrow schema decoded too."""
    metadata = pq.read_metadata(path).metadata or {}
    parts = [*metadata.keys(), *metadata.values()]
    if b"ARROW:schema" in metadata:
        parts.append(base64.b64decode(metadata[b"ARROW:schema"]))
    return b"\n".join(parts)


def read(root: Path, table: str) -> pa.Table:
    return pa.concat_tables(
        pq.read_table(path) for path in sorted((root / table).rglob("*.parquet"))
    )


# --- no caller readable in hash and drop modes; the control in raw mode ---------------------


@pytest.mark.parametrize(
    ("mode", "readable"),
    [("raw", True), ("hash", False), ("drop", False)],
    ids=["raw-control-finds-numbers", "hash", "drop"],
)
def test_no_caller_value_is_in_any_parquet_file(
    invoke: Invoke, sim: SimulatorServer, tmp_path: Path, mode: str, readable: bool
) -> None:
    archive(invoke, sim, mode)
    values = pii_values(sim)
    needles = long_values(values)
    assert len(values) > 100 and {"Alice", "Bob", REPEAT_NUMBER} <= values
    decoded: set[str] = set()
    in_bytes: set[str] = set()
    in_metadata: set[str] = set()
    for path in files(tmp_path / "parquet"):
        data = path.read_bytes()
        in_bytes |= {needle for needle in needles if needle.encode() in data}
        kv = metadata_bytes(path)
        in_metadata |= {value for value in values if value.encode() in kv}
        for value in strings(path):
            decoded |= {value} & values
            decoded |= {needle for needle in needles if needle in value}
    assert in_metadata == set()
    if readable:
        # The control: the decoded scan sees every number in raw mode (a byte scan of zstd
        # pages may or may not: it proves little alone).
        assert decoded >= {value for value in values if value.startswith("+31")}
    else:
        assert decoded == set()
        assert in_bytes == set()
    # SQL keeps the raw values for the operator (and the byte scan works: it finds them there).
    database = b"".join(path.read_bytes() for path in tmp_path.glob("archive.db*"))
    assert REPEAT_NUMBER.encode() in database


def test_hash_mode_writes_the_keyed_hmac_the_same_across_partitions_and_datasets(
    invoke: Invoke, sim: SimulatorServer, tmp_path: Path
) -> None:
    archive(invoke, sim, "hash")
    root = tmp_path / "parquet"
    expected = hmac.new(KEY.encode(), REPEAT_NUMBER.encode(), hashlib.sha256).hexdigest()
    recordings = read(root, "recordings").to_pylist()
    parties = read(root, "recording_parties").to_pylist()
    repeat = [row for row in recordings if row["originator_number"] == expected]
    assert len({row["created_at"].strftime("%Y-%m") for row in repeat}) == 3
    for row in repeat:
        # A number and the contact's identifier of the same number hash alike.
        assert row["originator_contact_identifier_value"] == expected
    repeat_ids = {row["id"] for row in repeat}
    assert {
        row["recording_id"]
        for row in parties
        if row["role"] == "originator" and row["number"] == expected
    } == repeat_ids
    # Every non-null PII value is 64 hex characters; the nulls (anonymous callers) stay null.
    for table, rows in (("recordings", recordings), ("recording_parties", parties)):
        written = [row[name] for row in rows for name in PII_COLUMNS[table]]
        assert None in written
        assert all(len(value) == 64 and set(value) <= HEX for value in written if value)
    # Back to raw (a mode change rewrites the files): each hash is its raw value's HMAC, and
    # every other column is as it was.
    assert invoke("export").exit_code == 0
    for table, hashed in (("recordings", recordings), ("recording_parties", parties)):
        raw = read(root, table)
        for name in PII_COLUMNS[table]:
            assert [row[name] for row in hashed] == [
                None if value is None else pseudonym(KEY.encode(), value)
                for value in raw.column(name).to_pylist()
            ]
        kept = [name for name in raw.schema.names if name not in PII_COLUMNS[table]]
        assert raw.select(kept).equals(pa.Table.from_pylist(hashed, schema=raw.schema).select(kept))


def test_query_counts_distinct_callers_as_in_raw_mode(
    invoke: Invoke, sim: SimulatorServer, tmp_path: Path
) -> None:
    sql = (
        "SELECT count(DISTINCT p.number) AS parties, count(DISTINCT r.originator_number) AS flat, "
        "count(DISTINCT p.number) FILTER (WHERE p.number = r.originator_number) AS joined "
        "FROM recording_parties p JOIN recordings r ON r.id = p.recording_id "
        "WHERE p.role = 'originator'"
    )

    def counts() -> dict[str, int]:
        result = invoke("query", "--json", sql)
        assert result.exit_code == 0, result.output
        (row,) = json.loads(result.output)
        return dict(row)

    archive(invoke, sim, "raw")
    raw = counts()
    engine = create_engine_for(f"sqlite:///{tmp_path / 'archive.db'}")
    with engine.connect() as connection:
        numbers = connection.execute(
            select(recording_parties.c.number)
            .where(recording_parties.c.role == "originator")
            .distinct()
        ).scalars()
        in_sql = sum(1 for number in numbers if number is not None)
    engine.dispose()
    assert invoke("export", pii="hash", key=KEY).exit_code == 0
    hashed = counts()
    assert hashed == raw == {"parties": in_sql, "flat": in_sql, "joined": in_sql}
    assert in_sql < len(sim.dataset.ids)  # the repeat caller counts once


def test_drop_keeps_the_schema_and_writes_nulls(
    invoke: Invoke, sim: SimulatorServer, tmp_path: Path
) -> None:
    archive(invoke, sim, "drop")
    root = tmp_path / "parquet"
    for path in files(root):
        table = path.parent.parent.name
        parquet = pq.ParquetFile(path)
        # The Arrow schema is today's exactly (ARROW:schema is untouched); only the file's
        # key-value metadata carries the mode.
        assert parquet.schema_arrow.remove_metadata() == TABLE_SCHEMAS[table]
        assert (parquet.metadata.metadata or {})[METADATA_KEY.encode()] == b"drop"
        content = parquet.read()
        for name in PII_COLUMNS[table]:
            assert content.column(name).null_count == content.num_rows
    assert read(root, "recordings").num_rows == len(sim.dataset.ids)
    assert read(root, "recording_parties").schema.remove_metadata() == PARTIES_SCHEMA


# --- a change of mode or key rewrites every partition; no change writes nothing --------------


def policy(mode: str, key: str | None) -> PiiPolicy:
    return PiiPolicy.from_settings(Settings(parquet_pii=mode, pii_key=key))


def snapshot(root: Path) -> dict[Path, tuple[int, int, bytes]]:
    return {
        path: (path.stat().st_ino, path.stat().st_mtime_ns, path.read_bytes())
        for path in files(root)
    }


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (("raw", None), ("hash", KEY)),
        (("hash", KEY), ("hash", OTHER_KEY)),
        (("hash", KEY), ("drop", None)),
        (("drop", None), ("raw", None)),
        (("hash", KEY), ("raw", OTHER_KEY)),
    ],
    ids=["raw-to-hash", "new-key", "hash-to-drop", "drop-to-raw", "hash-to-raw"],
)
def test_a_mode_or_key_change_rewrites_every_partition(
    invoke: Invoke,
    sim: SimulatorServer,
    tmp_path: Path,
    before: tuple[str, str | None],
    after: tuple[str, str | None],
) -> None:
    archive(invoke, sim, before[0], before[1])
    root = tmp_path / "parquet"
    first = snapshot(root)
    assert invoke("export", pii=before[0], key=before[1]).exit_code == 0
    assert invoke("export", "--full", pii=before[0], key=before[1]).exit_code == 0
    assert snapshot(root) == first  # nothing changed: nothing written, same bytes

    result = invoke("export", pii=after[0], key=after[1])  # plain export, nothing due in SQL
    assert result.exit_code == 0, result.output
    second = snapshot(root)
    assert second.keys() == first.keys()
    assert all(second[path][0] != first[path][0] for path in first), "a partition was kept"
    expected = policy(*after).tag
    for path in second:
        tag = (pq.read_metadata(path).metadata or {}).get(METADATA_KEY.encode())
        assert (tag.decode() if tag else None) == expected
    assert invoke("export", pii=after[0], key=after[1]).exit_code == 0
    assert snapshot(root) == second  # and the next export writes nothing again


def test_a_mode_change_on_an_s3_root_rewrites_every_partition(
    invoke: Invoke,
    sim: SimulatorServer,
    tmp_path: Path,
    s3_endpoint: str,
    s3_bucket: str,
    s3_client: Any,
) -> None:
    archive(invoke, sim, "raw")
    engine = create_engine_for(f"sqlite:///{tmp_path / 'archive.db'}")
    root = f"s3://{s3_bucket}/analytics"

    def etags() -> dict[str, str]:
        listed = s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="analytics/")["Contents"]
        return {item["Key"]: item["ETag"] for item in listed}

    try:
        export_changed(engine, root, s3_endpoint_url=s3_endpoint, full=True)
        before = etags()
        hashed = policy("hash", KEY)
        report = export_changed(engine, root, s3_endpoint_url=s3_endpoint, pii=hashed)
        after = etags()
        assert after.keys() == before.keys() and len(before) >= 6
        assert all(after[key] != before[key] for key in before)
        assert len(report.partitions) == len(before) // 2 and report.unchanged == []
        again = export_changed(engine, root, s3_endpoint_url=s3_endpoint, pii=hashed)
        assert again.partitions == [] and etags() == after
    finally:
        engine.dispose()


def test_an_interrupted_mode_change_is_finished_by_the_next_export(
    invoke: Invoke, sim: SimulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recarchive.export import parquet

    archive(invoke, sim, "raw")
    root = tmp_path / "parquet"
    months = sorted({path.parent.name for path in files(root)})
    real_place = parquet._Target.place
    written: list[str] = []

    def place_three_then_fail(self: Any, table: str, month: str, *args: Any) -> None:
        if len(written) == 3:  # the first month whole, the second's recordings file only
            raise OSError("disk full")
        written.append(f"{table}/{month}")
        real_place(self, table, month, *args)

    monkeypatch.setattr(parquet._Target, "place", place_three_then_fail)
    assert invoke("export", pii="hash", key=KEY).exit_code == 1
    monkeypatch.setattr(parquet._Target, "place", real_place)
    done = {path: state for path, state in snapshot(root).items() if path.parent.name == months[0]}
    assert invoke("export", pii="hash", key=KEY).exit_code == 0
    assert {path: snapshot(root)[path] for path in done} == done  # the finished month is kept
    tags = {
        path: (pq.read_metadata(path).metadata or {}).get(METADATA_KEY.encode())
        for path in files(root)
    }
    assert len({path.parent.name for path in tags}) == len(months)
    assert set(tags.values()) == {str(policy("hash", KEY).tag).encode()}


# --- settings: exit 2 before any request; the key is never shown -----------------------------


@pytest.mark.parametrize(
    ("pii", "key", "message"),
    [
        ("hash", None, "RECARCHIVE_PARQUET_PII=hash needs RECARCHIVE_PII_KEY"),
        ("hash", SHORT_KEY, f"RECARCHIVE_PII_KEY: must be at least {MIN_PII_KEY_LENGTH}"),
        ("raw", SHORT_KEY, "RECARCHIVE_PII_KEY: must be at least"),
        ("mask", None, "RECARCHIVE_PARQUET_PII"),
    ],
    ids=["hash-without-key", "hash-short-key", "raw-short-key", "unknown-mode"],
)
def test_bad_pii_settings_exit_2_before_any_request(
    invoke: Invoke, sim: SimulatorServer, pii: str, key: str | None, message: str
) -> None:
    result = invoke("archive", "--skip-media", *sim.dataset.ids[:3], pii=pii, key=key)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())  # the console wraps long lines
    assert key is None or key not in result.output
    assert sim.requests == []


@pytest.mark.parametrize(
    ("given", "mode"),
    [("", "raw"), ("HASH", "hash"), (" drop ", "drop")],
    ids=["empty-is-raw", "upper-case", "spaces"],
)
def test_pii_mode_spellings(given: str, mode: str) -> None:
    settings = Settings(parquet_pii=given, pii_key=KEY)
    assert settings.parquet_pii == mode
    assert KEY not in repr(settings) and KEY not in repr(PiiPolicy.from_settings(settings))


def test_a_hash_policy_needs_a_key() -> None:
    with pytest.raises(ConfigError, match="RECARCHIVE_PII_KEY"):
        PiiPolicy("hash")


def test_the_pii_key_never_reaches_logs_output_parquet_or_the_database(
    env: dict[str, str], sim: SimulatorServer, tmp_path: Path
) -> None:
    """Every command, verbose, in a process of its own; then every byte the run left."""
    full_env = {**os.environ, **env, "RECARCHIVE_PARQUET_PII": "hash", "RECARCHIVE_PII_KEY": KEY}
    cli = [str(Path(sys.executable).parent / "recarchive")]
    commands = [
        ["archive", "--skip-media", "-v", *sim.dataset.ids],
        ["export", "--full"],
        ["status", "--json"],
        ["query", "SELECT count(DISTINCT number) FROM recording_parties"],
    ]
    seen = []
    for command in commands:
        done = subprocess.run(
            [*cli, *command], env=full_env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        seen += [done.stdout, done.stderr]
    assert "INFO" in "".join(seen)  # the verbose log was there to look at
    leftovers = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.suffix == ".parquet" for path in leftovers)
    for text in seen:
        assert KEY not in text
    for path in leftovers:
        data = path.read_bytes()
        assert KEY.encode() not in data, path
        if path.suffix == ".parquet":
            assert KEY.encode() not in metadata_bytes(path)


# --- the hash function -----------------------------------------------------------------------


#: Keys as the setting gives them: text of at least the minimum length, no NUL (an environment
#: variable cannot hold one; HMAC pads short keys with zero bytes, so ``k`` and ``k\0`` agree).
KEYS = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00"), min_size=MIN_PII_KEY_LENGTH
).map(str.encode)


@given(key=KEYS, other=KEYS, value=st.text())
def test_pseudonym_is_deterministic_keyed_hex(key: bytes, other: bytes, value: str) -> None:
    digest = pseudonym(key, value)
    assert digest == pseudonym(key, value)
    assert len(digest) == 64 and set(digest) <= HEX
    assert digest == hmac.new(key, value.encode(), hashlib.sha256).hexdigest()
    assert (pseudonym(other, value) == digest) == (other == key)


@given(
    key=KEYS,
    values=st.lists(
        st.one_of(st.none(), st.sampled_from(["+31612345678", "Alice", ""]), st.text())
    ),
)
@example(key=b"long key, hashed first by HMAC " * 4, values=["+31612345678", None])
def test_the_batch_path_equals_the_hash_of_each_value(key: bytes, values: list[str | None]) -> None:
    """Dictionary-encoded hashing of a batch gives each value's own pseudonym, nulls kept."""
    policy = PiiPolicy("hash", key)
    columns = {name: pa.array(values, pa.string()) for name in PARTIES_SCHEMA.names}
    batch = pa.RecordBatch.from_pydict(
        {
            name: columns[name] if field.type == pa.string() else pa.nulls(len(values), field.type)
            for name, field in zip(PARTIES_SCHEMA.names, PARTIES_SCHEMA, strict=True)
        },
        schema=PARTIES_SCHEMA,
    )
    out = policy.batch("recording_parties", batch)
    expected = [None if value is None else pseudonym(key, value) for value in values]
    for name in PARTIES_SCHEMA.names:
        if name in PII_COLUMNS["recording_parties"]:
            assert out.column(name).to_pylist() == expected
        else:
            assert out.column(name).equals(batch.column(name))
