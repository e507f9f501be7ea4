"""Taking over the ledger leases of runs on this host that were killed.

A run that dies without unwinding (SIGKILL, OOM killer, power loss of a container) keeps its
leases until they expire (``lease_seconds``, 15 minutes by default), so an immediate rerun
would find its recordings busy. Lease owners are ``host:pid:random``
(:func:`run_owner`): on the same host, a pid that no longer exists proves
the owner is gone, and its leases can be released at once. Owners on other hosts, owners whose
process still runs (or whose pid was reused by another process) and names of any other shape
are left alone: their leases expire on their own.

Within this process, an owner is alive exactly while the run that uses it is open
(:func:`active_owner`): a run of this process that ended — even one stopped by a database
outage that kept it from releasing its leases or finishing its ``runs`` row — no longer holds
anything, so the next run in the same process (a Prefect worker serving flows in-process, a
test) takes its leases over at once.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from recarchive.model import LedgerEntry

logger = logging.getLogger(__name__)

#: Checks whether a process id is alive on this host.
PidCheck = Callable[[int], bool]

#: Owner names of the runs open in this process (see :func:`active_owner`).
_active_owners: set[str] = set()
_active_lock = threading.Lock()


@contextlib.contextmanager
def active_owner(owner: str) -> Iterator[str]:
    """Mark ``owner`` as a live run of this process for the duration of the block."""
    with _active_lock:
        _active_owners.add(owner)
    try:
        yield owner
    finally:
        with _active_lock:
            _active_owners.discard(owner)


def _owner_of_this_process_gone(owner: str) -> bool:
    with _active_lock:
        return owner not in _active_owners


def pid_alive(pid: int) -> bool:
    """Return whether process ``pid`` exists on this host.

    Signal 0 checks existence and permission without sending anything. ``EPERM`` means the
    process exists under another user: alive. Anything unexpected counts as alive, because
    wrongly taking over a live run's lease could start a second transfer.
    """
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as exc:
        return exc.errno != errno.ESRCH
    return True


def owner_pid_on_host(owner: str, hostname: str) -> int | None:
    """Return the pid of a ``host:pid:random`` lease owner on ``hostname``, else ``None``."""
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != hostname or not parts[1].isdigit():
        return None
    return int(parts[1])


def local_owner_dead(
    owner: str, *, hostname: str | None = None, alive: PidCheck = pid_alive
) -> bool:
    """Return whether ``owner`` (``host:pid:random``) is a process of this host that is gone.

    ``False`` for owners of other hosts, of live processes and of any other shape: only a
    proven death counts.
    """
    pid = owner_pid_on_host(owner, socket.gethostname() if hostname is None else hostname)
    if pid is None:
        return False
    if pid == os.getpid():
        return _owner_of_this_process_gone(owner)
    return not alive(pid)


def dead_local_owners(
    entries: Iterable[LedgerEntry],
    *,
    own_owner: str,
    hostname: str | None = None,
    alive: PidCheck = pid_alive,
) -> dict[str, list[str]]:
    """Group the leased entries whose owner is a dead process on this host, by owner.

    Args:
        entries: Ledger rows (their ``lease_owner`` is looked at; expiry is not: an expired
            lease is free for the claim anyway, and releasing it does no harm).
        own_owner: This run's owner name, never taken over.
        hostname: This host's name (``socket.gethostname()`` when ``None``).
        alive: The liveness check (injected by tests).

    Returns:
        ``{owner: [recording ids]}`` of leases that may be released.
    """
    host = socket.gethostname() if hostname is None else hostname
    verdicts: dict[str, bool] = {}
    dead: dict[str, list[str]] = {}
    for entry in entries:
        owner = entry.lease_owner
        if not owner or owner == own_owner:
            continue
        if owner not in verdicts:
            verdicts[owner] = local_owner_dead(owner, hostname=host, alive=alive)
        if verdicts[owner]:
            dead.setdefault(owner, []).append(entry.recording_id)
    return dead


def release_dead_leases(
    entries: Iterable[LedgerEntry],
    release: Callable[..., None],
    *,
    own_owner: str,
    hostname: str | None = None,
    alive: PidCheck = pid_alive,
) -> set[str]:
    """Release the leases of ``entries`` held by dead processes of this host.

    ``release(ids, owner=...)`` (:meth:`recarchive.store.claims.LedgerClaims.release`) clears a
    lease only where that owner still holds it, so a row another run claimed meanwhile is
    untouched.

    Args:
        entries: Ledger rows of the IDs about to be claimed.
        release: The store's ``release``.
        own_owner: This run's owner name.
        hostname: This host's name (``socket.gethostname()`` when ``None``).
        alive: The liveness check (injected by tests).

    Returns:
        The recording IDs whose lease was released (their work may have been in flight).
    """
    taken: set[str] = set()
    for owner, ids in dead_local_owners(
        entries, own_owner=own_owner, hostname=hostname, alive=alive
    ).items():
        release(ids, owner=owner)
        logger.warning(
            "took over %d lease(s) of run %s: its process is gone (killed?)", len(ids), owner
        )
        taken.update(ids)
    return taken


def run_owner() -> str:
    """Return a lease owner name unique to this run: host, process and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
