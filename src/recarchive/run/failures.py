"""Which failures stop a run, which end one item ``failed``, and which are worth a retry.

One bad recording never stops the others (:mod:`recarchive.run.chunk` ends it ``failed``);
only a :class:`~recarchive.errors.FatalError` stops a run: credentials refused, the ledger
database down, the local disk full or read-only. The helpers here draw those lines in one
place.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from recarchive.errors import AuthError, StorageUnavailableError, UsageError

#: errno values of the local disk that every other item would meet as well: stop the run.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def database_is_down(exc: SQLAlchemyError) -> bool:
    """True when a failed write says the database itself is the problem (stop the run).

    Operational and interface errors, and any error that invalidated the connection, are the
    database's; other DBAPI errors (a value a column cannot hold, a constraint) and errors
    raised while binding parameters are about the rows written.
    """
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


class RowsRefused(Exception):
    """The database (or its driver) refused rows for their content; ``__cause__`` says how."""


@contextlib.contextmanager
def ledger_errors(action: str) -> Iterator[None]:
    """Translate a database failure into the fatal error that stops the run cleanly.

    Only the error's type is kept: driver messages can quote connection details.
    """
    try:
        yield
    except SQLAlchemyError as exc:
        raise StorageUnavailableError(f"{action}: {type(exc).__name__}") from exc


def should_retry_chunk(exc: BaseException | None) -> bool:
    """Whether a failed chunk task is worth a Prefect retry.

    Bad credentials or bad input fail every retry the same way; anything else that escaped
    the chunk (a store hiccup, a lost connection to the database) is chunk-level and
    transient. Single requests were already retried by the Bird client.
    """
    return isinstance(exc, Exception) and not isinstance(exc, AuthError | UsageError)
