"""Temp files carry their owner in the name; those of killed processes of this host are swept."""

from __future__ import annotations

import socket
from pathlib import Path

from recarchive.ids.read import collect_ids
from recarchive.tempfiles import IDS_SUFFIX, remove_orphan_temp_files, temp_prefix


def test_temp_files_of_dead_processes_of_this_host_are_removed(tmp_path: Path) -> None:
    host = socket.gethostname()
    dead_media = tmp_path / f"recarchive-{host}-4242-abc123.mp3.part"
    dead_ids = tmp_path / f"recarchive-{host}-4242-mno345.ids"
    live = tmp_path / f"recarchive-{host}-4343-def456.mp3.part"
    own = tmp_path / f"{temp_prefix()}ghi789.ids"
    elsewhere = tmp_path / "recarchive-other-host-4242-jkl012.mp3.part"
    unrelated = tmp_path / f"recarchive-{host}-4242-pqr678.parquet"
    for path in (dead_media, dead_ids, live, own, elsewhere, unrelated):
        path.write_bytes(b"partial")
    asked: list[int] = []

    def alive(pid: int) -> bool:
        asked.append(pid)
        return pid == 4343

    assert remove_orphan_temp_files(tmp_path, alive=alive) == 2
    assert sorted(tmp_path.iterdir()) == sorted([live, own, elsewhere, unrelated])
    assert sorted(asked) == [4242, 4343]  # never this process, never another host's


def test_a_missing_folder_is_nothing_to_sweep(tmp_path: Path) -> None:
    assert remove_orphan_temp_files(tmp_path / "gone") == 0


def test_id_spool_is_named_after_this_process(tmp_path: Path) -> None:
    with collect_ids(["2f3b6b6e-8d8a-4a55-9f0e-1c1d2b3a4f5e"], spool_dir=str(tmp_path)):
        (spool,) = tmp_path.iterdir()
        assert spool.name.startswith(temp_prefix()) and spool.name.endswith(IDS_SUFFIX)
        # Its own process is alive: the sweep leaves it alone.
        assert remove_orphan_temp_files(tmp_path) == 0
    assert list(tmp_path.iterdir()) == []
