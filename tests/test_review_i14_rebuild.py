"""Defects an independent review found in rebuild against issue 14's locks and classes.

Each test failed before its fix. The fixtures are test_rebuild's, imported (hence F811).
"""
# ruff: noqa: F811

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

from recarchive.simulator.server import SimulatorServer
from tests.fixtures.cli import Invoke
from tests.test_rebuild import env, invoke, sim, sql_rows  # noqa: F401


def test_rebuild_verify_survives_mp3s_in_an_archive_class(
    invoke: Invoke,
    sim: SimulatorServer,
    tmp_path: Path,
) -> None:
    """run/rebuild.py:_read: media.hash_object of a GLACIER MP3 raises StorageUnavailableError
    (InvalidObjectState), which `except StorageUnavailableError: raise` turns into the end of
    the whole rebuild: with RECARCHIVE_S3_STORAGE_CLASS=GLACIER or DEEP_ARCHIVE,
    `rebuild --verify` cannot rebuild anything."""
    ids = sim.dataset.available_ids()[:3]
    archived = invoke("archive", *ids, RECARCHIVE_S3_STORAGE_CLASS="GLACIER")
    assert archived.exit_code == 0, archived.output
    shutil.rmtree(tmp_path / "db")
    shutil.rmtree(tmp_path / "parquet")
    result = invoke("rebuild", "--verify", "--overwrite-parquet")
    rows = sql_rows(tmp_path / "db" / "archive.db", "SELECT id FROM recordings")
    assert len(rows) == 3, result.output


def test_archived_mp3s_carry_their_archived_at_for_rebuild(
    invoke: Invoke,
    sim: SimulatorServer,
    tmp_path: Path,
    s3_client: S3Client,
    s3_bucket: str,
) -> None:
    """Issue 15 (2): "write what a rebuild needs and the sidecar lacks (archivedAt) into the
    object metadata from now on". media/inventory.py reads ``archived-at`` but at HEAD
    nothing writes it (objects.object_metadata has sha256 and confirmed-by only), so rebuild
    falls back to LastModified and the ledger's archived_at does not round-trip."""
    ids = sim.dataset.available_ids()[:2]
    assert invoke("archive", *ids).exit_code == 0
    rows = sql_rows(
        tmp_path / "db" / "archive.db", "SELECT s3_key, archived_at FROM archive_ledger"
    )
    for row in rows:
        metadata = s3_client.head_object(Bucket=s3_bucket, Key=row["s3_key"])["Metadata"]
        assert "archived-at" in metadata, metadata


def test_rebuild_keeps_the_retention_and_legal_holds_the_objects_carry(
    invoke: Invoke,
    sim: SimulatorServer,
    tmp_path: Path,
    s3_client: S3Client,
) -> None:
    """run/rebuild.py:_read builds the ledger row from size, sha256 and archived-at only: its
    lock_mode, retain_until and legal_hold stay NULL/false although the objects' HEAD shows
    them. After a rebuild `status --json` says nothing is locked or held, and the ledger, which
    docs/compliance.md names as the auditor's answer to "which retention / hold", is wrong."""
    import json

    bucket = f"review3-lock-{tmp_path.name[-10:].lower().replace('_', '-')}".strip("-")
    s3_client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    lock = {
        "RECARCHIVE_S3_BUCKET": bucket,
        "RECARCHIVE_S3_OBJECT_LOCK_MODE": "GOVERNANCE",
        "RECARCHIVE_S3_RETENTION_DAYS": "3650",
    }
    ids = sim.dataset.available_ids()[:3]
    assert invoke("archive", *ids, **lock).exit_code == 0
    assert invoke("hold", ids[0], "--on", **lock).exit_code == 0
    before = json.loads(invoke("status", "--json", **lock).stdout)["object_lock"]
    assert before["locked"] == 3 and before["held"] == 1
    shutil.rmtree(tmp_path / "db")
    shutil.rmtree(tmp_path / "parquet")
    rebuilt = invoke("rebuild", **lock)
    assert rebuilt.exit_code == 0, rebuilt.output
    after = json.loads(invoke("status", "--json", **lock).stdout)["object_lock"]
    assert after == before
