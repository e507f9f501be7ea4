"""Temp files named after their owner process, and the sweep of those of killed processes.

While a run works, it keeps media downloads (``*.mp3.part``) and its spooled ID list
(``*.ids``) in the temp folder (``RECARCHIVE_TEMP_DIR``), and an export writes each Parquet
file first to a temp file (``*.parquet.tmp``: in the partition's folder, or for an ``s3://``
root in the system temp folder). A run killed with SIGKILL or by the
OOM killer cannot remove them; without a sweep, each crash would leave up to ``concurrency``
partial MP3s and an ID list of up to millions of lines behind for good. Names are
``recarchive-{host}-{pid}-{random}{suffix}`` (with a leading dot for Parquet temp files, which
dataset readers skip): the owner is in the name, so the files of a
killed process can be told apart from those of a live one and from those of other hosts
sharing the folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import tempfile
from pathlib import Path

from recarchive.leases import PidCheck, pid_alive

logger = logging.getLogger(__name__)

#: Suffix of a media download in progress.
MEDIA_SUFFIX = ".mp3.part"
#: Suffix of a run's spooled ID list.
IDS_SUFFIX = ".ids"
#: Suffix of a Parquet file being written by an export.
EXPORT_SUFFIX = ".parquet.tmp"
# The random part never holds "-": the host (which may) is everything before the pid.
_OWNED_NAME = re.compile(
    r"^\.?recarchive-(?P<host>.+)-(?P<pid>[0-9]+)-[^-]*(?:\.mp3\.part|\.ids|\.parquet\.tmp)$"
)


def _host_tag() -> str:
    return socket.gethostname().replace(os.sep, "_")


def temp_prefix() -> str:
    """Return the name prefix of this process's temp files (host and pid in it)."""
    return f"recarchive-{_host_tag()}-{os.getpid()}-"


def remove_orphan_temp_files(temp_dir: str | Path | None, *, alive: PidCheck = pid_alive) -> int:
    """Delete the temp files left behind by killed processes of this host.

    Only files named by :func:`temp_prefix` with this host's name and a pid that no longer
    exists are removed: a live run's files, and those of other hosts sharing the folder, stay.

    Args:
        temp_dir: The temp folder (the system default when ``None``).
        alive: The liveness check (injected by tests).

    Returns:
        How many files were removed.
    """
    folder = Path(temp_dir) if temp_dir else Path(tempfile.gettempdir())
    host = _host_tag()
    verdicts: dict[int, bool] = {os.getpid(): True}
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        match = _OWNED_NAME.match(entry.name)
        if match is None or match["host"] != host:
            continue
        pid = int(match["pid"])
        if pid not in verdicts:
            verdicts[pid] = alive(pid)
        if not verdicts[pid]:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)  # noqa: PTH108
                removed += 1
    if removed:
        logger.warning("removed %d temp file(s) of killed runs from %s", removed, folder)
    return removed
