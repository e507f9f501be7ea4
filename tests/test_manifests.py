"""Manifests of child runs (``run.inputs``) in S3: written and read through the media store.

Against moto's server: a manifest carries the SSE settings media gets, and nothing that could
keep a child run from reading it (no storage class other than STANDARD, no object lock);
S3 failures arrive as the project's errors, never as raw botocore exceptions.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from botocore.exceptions import BotoCoreError, ClientError

from recarchive.config import Settings
from recarchive.errors import InputError, StorageUnavailableError
from recarchive.ids.spool import spool_ids
from recarchive.run.inputs import ids_per_child, open_manifest, write_manifests
from tests.fixtures.s3 import SseCase

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

IDS = [str(uuid.UUID(int=n)) for n in range(1, 8)]
RUN_KEY = "backfill-test"


def s3_settings(tmp_path: Path, endpoint: str, bucket: str, **extra: Any) -> Settings:
    return Settings(
        s3_bucket=bucket,
        s3_endpoint_url=endpoint,
        s3_prefix="archive",
        temp_dir=str(tmp_path),
        **extra,
    )


def manifests(settings: Settings) -> list[str]:
    with spool_ids(IDS, source="test", spool_dir=str(settings.temp_dir)) as id_list:
        return write_manifests(settings, id_list, ids_per_manifest=3, run_key=RUN_KEY)


def split(location: str) -> tuple[str, str]:
    bucket, _, key = location.removeprefix("s3://").partition("/")
    return bucket, key


def test_manifests_are_encrypted_like_media(
    s3_client: S3Client, s3_endpoint: str, s3_bucket: str, tmp_path: Path, sse_case: SseCase
) -> None:
    settings = s3_settings(
        tmp_path, s3_endpoint, s3_bucket, s3_sse=sse_case.sse, s3_sse_kms_key_id=sse_case.kms_key_id
    )
    locations = manifests(settings)
    # The key layout and the locations handed to child runs are unchanged.
    assert locations == [
        f"s3://{s3_bucket}/archive/manifests/{RUN_KEY}/part-{n:05d}.txt" for n in range(3)
    ]
    for location in locations:
        head = s3_client.head_object(Bucket=s3_bucket, Key=split(location)[1])
        sse_case.assert_shown_by(head)
        # Nothing that could delay or refuse a child run's read, or the manifest's deletion.
        assert head.get("StorageClass", "STANDARD") == "STANDARD"
        assert not {key for key in head if key.startswith("ObjectLock")}


def test_manifests_round_trip_through_s3(s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    settings = s3_settings(tmp_path, s3_endpoint, s3_bucket, s3_sse="AES256")
    read: list[str] = []
    for location in manifests(settings):
        with open_manifest(settings, location) as id_list:
            read.extend(id_list)
    assert read == IDS


def test_without_a_bucket_manifests_stay_local(tmp_path: Path) -> None:
    settings = Settings(temp_dir=str(tmp_path))
    locations = manifests(settings)
    folder = tmp_path / "manifests" / RUN_KEY
    assert locations == [str((folder / f"part-{n:05d}.txt").resolve()) for n in range(3)]
    assert (folder / "part-00002.txt").read_text() == IDS[6] + "\n"


def test_a_failed_manifest_write_is_the_projects_error(s3_endpoint: str, tmp_path: Path) -> None:
    settings = s3_settings(tmp_path, s3_endpoint, "no-such-manifest-bucket")
    with pytest.raises(StorageUnavailableError, match="NoSuchBucket") as info:
        manifests(settings)
    assert not isinstance(info.value, ClientError | BotoCoreError)
    assert "put s3://no-such-manifest-bucket/archive/manifests/" in str(info.value)


def test_an_unreadable_manifest_is_an_input_error(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    settings = s3_settings(tmp_path, s3_endpoint, s3_bucket)
    missing = f"s3://{s3_bucket}/archive/manifests/{RUN_KEY}/part-99999.txt"
    with (
        pytest.raises(InputError, match="cannot read manifest s3://") as info,
        open_manifest(settings, missing),
    ):
        pass
    assert isinstance(info.value.__cause__, StorageUnavailableError)


def test_a_manifest_of_another_bucket_needs_no_bucket_setting(
    s3_client: S3Client, s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    s3_client.put_object(Bucket=s3_bucket, Key="ids.txt", Body="\n".join(IDS).encode())
    settings = Settings(s3_endpoint_url=s3_endpoint, temp_dir=str(tmp_path))
    with open_manifest(settings, f"s3://{s3_bucket}/ids.txt") as id_list:
        assert list(id_list) == IDS


@pytest.mark.parametrize(
    ("total", "children", "chunks_per_child", "expected", "manifests"),
    [
        (2000, None, None, 250, 8),
        (2000, 2, None, 1000, 2),
        (5, 8, None, 1, 5),
        (0, None, None, 1, 0),
        (2001, 4, None, 501, 4),
        (2000, None, 3, 300, 7),
    ],
    ids=["default-8", "two", "fewer-ids-than-children", "empty", "rounded-up", "chunks"],
)
def test_ids_per_child_splits_into_the_children_asked_for(
    total: int, children: int | None, chunks_per_child: int | None, expected: int, manifests: int
) -> None:
    size = ids_per_child(
        total, chunk_size=100, children=children, chunks_per_child=chunks_per_child
    )
    assert size == expected
    assert -(-total // size) == manifests


@pytest.mark.parametrize(
    ("children", "chunks_per_child", "message"),
    [
        (2, 2, "not both"),
        (0, None, "children must be from 1"),
        (1001, None, "children must be from 1 to 1000"),
        (None, 0, "at least 1"),
    ],
    ids=["both", "no-children", "too-many-children", "no-chunks"],
)
def test_ids_per_child_refuses_a_split_it_cannot_make(
    children: int | None, chunks_per_child: int | None, message: str
) -> None:
    with pytest.raises(InputError, match=message):
        ids_per_child(100, chunk_size=10, children=children, chunks_per_child=chunks_per_child)
