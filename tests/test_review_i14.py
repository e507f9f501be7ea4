"""Defects an independent review found in the issue 14 merge, each fixed; each test failed before.

The fixtures are those of test_parquet_pii and test_erase, imported (hence F811).
"""
# ruff: noqa: F811, E402

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from recarchive.export.pii import METADATA_KEY
from recarchive.simulator.server import SimulatorServer
from tests.test_parquet_pii import (  # noqa: F401  (fixtures)
    KEY,
    Invoke,
    archive,
    clean_env,
    env,
    files,
    invoke,
    long_values,
    pii_values,
    sim,
    strings,
)


def test_erase_under_hash_mode_does_not_rewrite_the_dataset_with_raw_numbers(
    invoke: Invoke, sim: SimulatorServer, tmp_path: Path
) -> None:
    """run/erase.py:308 calls export_changed without the PII policy: RAW is used, every
    partition tagged ``hash`` counts as stale, and the whole dataset is rewritten raw."""
    archive(invoke, sim, "hash")
    root = tmp_path / "parquet"
    assert len({p.parent.name for p in files(root)}) >= 3
    victim = sim.dataset.ids[0]
    result = invoke("erase", "--json", "--reason", "ticket 1", victim, pii="hash", key=KEY)
    assert result.exit_code == 0, result.output
    numbers = long_values(pii_values(sim))
    leaked = {value for path in files(root) for value in strings(path) if value in numbers}
    assert not leaked, f"{len(leaked)} raw caller values in Parquet after an erase under hash"
    for path in files(root):
        tag = (pq.read_metadata(path).metadata or {}).get(METADATA_KEY.encode())
        assert tag is not None and tag.startswith(b"hash:"), (path, tag)


# --- erase leaves the audio of an unfinished multipart upload behind --------------------------

from sqlalchemy import update

from recarchive.media.keys import object_prefix
from recarchive.store.tables import archive_ledger
from tests.test_erase import Archive
from tests.test_erase import archive as erase_archive  # noqa: F401


def test_erase_aborts_open_multipart_uploads_of_the_recording(erase_archive: Archive) -> None:
    """run/erase.py:_objects lists object versions only: the parts of a multipart upload a
    killed run left open at the pinned key (MP3 audio) survive the erase, billed and readable
    with ListParts, until a lifecycle rule (if any) aborts them."""
    archive = erase_archive
    victim = archive.ids[0]
    key = archive.key(victim)
    # A run killed mid-upload: the recording is failed, its key pinned, parts uploaded.
    with archive.store().engine.begin() as connection:
        connection.execute(
            update(archive_ledger)
            .where(archive_ledger.c.recording_id == victim)
            .values(state="failed", sha256=None, size_bytes=None)
        )
    upload = archive.s3.create_multipart_upload(Bucket=archive.bucket, Key=key)
    archive.s3.upload_part(
        Bucket=archive.bucket,
        Key=key,
        UploadId=upload["UploadId"],
        PartNumber=1,
        Body=b"ID3 caller audio " * 1000,
    )
    code, results = archive.erase("--bypass-governance", victim)
    assert code == 0, results
    left = archive.s3.list_multipart_uploads(Bucket=archive.bucket, Prefix=object_prefix(key)).get(
        "Uploads", []
    )
    assert left == [], f"{len(left)} open multipart upload(s) with audio left after erase"


# --- an erased recording that had no media yet leaves no S3 tombstone -------------------------

from typer.testing import CliRunner

from recarchive.cli.app import app
from tests.fixtures.simulator import SimulatorFactory


def test_erasing_a_recording_without_media_leaves_a_tombstone_for_rebuild(
    simulator_factory: SimulatorFactory, s3_client, s3_bucket: str, s3_endpoint: str, tmp_path: Path
) -> None:
    """run/erase.py:218 writes ``{id}.erased.json`` only when the ledger has a pinned key. A
    recording erased while ``metadata_only`` (media not ready, or --skip-media) leaves nothing
    in S3, so after the database is lost `rebuild` cannot restore its tombstone and the next
    window run fetches the erased recording again (metadata, then media)."""
    sim = simulator_factory(recordings=10, seed=3, available_fraction=0.0)
    env = {
        "RECARCHIVE_DATABASE_URL": f"sqlite:///{tmp_path / 'archive.db'}",
        "RECARCHIVE_PARQUET_ROOT": str(tmp_path / "parquet"),
        "RECARCHIVE_S3_BUCKET": s3_bucket,
        "RECARCHIVE_S3_ENDPOINT_URL": s3_endpoint,
        "RECARCHIVE_REQUESTS_PER_SECOND": "1000",
        "RECARCHIVE_BIRD_API_URL": sim.api_url,
        "RECARCHIVE_BIRD_ACCESS_KEY": sim.config.access_key,
        "RECARCHIVE_WORKSPACE_ID": sim.config.workspace_id,
    }
    runner = CliRunner()
    victim = sim.dataset.ids[0]
    done = runner.invoke(app, ["archive", victim], env=env, catch_exceptions=False)
    assert done.exit_code == 0, done.output
    erased = runner.invoke(
        app, ["erase", "--reason", "ticket 7", victim], env=env, catch_exceptions=False
    )
    assert erased.exit_code == 0, erased.output
    keys = [
        item["Key"]
        for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
        for item in page.get("Contents", [])
    ]
    assert any(key.endswith(f"{victim}.erased.json") for key in keys), keys


# --- RECARCHIVE_LOG_FORMAT=json is ignored by erase, hold and rebuild ------------------------


def test_hold_logs_json_lines_under_log_format_json(erase_archive: Archive) -> None:
    """cli/hold.py:33 (and cli/erase.py:59, cli/rebuild.py:44) call load_settings() instead of
    app._settings(), so apply_log_format never runs: their log lines stay text."""
    archive = erase_archive
    result = archive.invoke("hold", archive.ids[0], "--on", "-v", RECARCHIVE_LOG_FORMAT="json")
    assert result.exit_code == 0, result.output
    logged = [line for line in result.stderr.splitlines() if "legal hold on for" in line]
    assert logged, result.stderr
    for line in logged:
        assert json.loads(line)["level"] == "INFO", line
