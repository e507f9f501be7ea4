"""One exception tree for recarchive.

Every boundary (HTTP, S3, SQL, files) translates the errors of its library into one of
these types with ``raise ... from exc``, so retry decisions are made on our types and never
on message strings:

* :class:`RetryableError` — transient; the same operation may succeed later.
* :class:`TerminalError` — final for one item (one recording); the run goes on.
* :class:`FatalError` — the run cannot go on (bad credentials, unreachable database).
* :class:`UsageError` — bad configuration or input, found before any work is done (exit 2).

Messages never carry secrets: the access key, presigned URL query strings and
``Authorization`` headers stay out of every ``str(exc)`` and ``repr(exc)``.
"""

from __future__ import annotations


class RecarchiveError(Exception):
    """Base of every error raised by recarchive."""


# --- bad usage: nothing processed, exit code 2 ---------------------------------------------


class UsageError(RecarchiveError):
    """Bad configuration or bad input, detected before any work started."""


class ConfigError(UsageError):
    """A setting is missing or invalid; the message names the environment variable."""


class InputError(UsageError):
    """Bad input (IDs, files, dates); ``problems`` lists every bad value with its place.

    Args:
        message: One-line summary.
        problems: One human-readable line per problem, e.g. ``"ids.txt:3: 'abc' is not a UUID"``.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems: list[str] = problems or []


# --- the run stops ------------------------------------------------------------------------


class FatalError(RecarchiveError):
    """The run cannot continue (for any item)."""


class AuthError(FatalError):
    """The Bird API refused the credentials (401/403): every further request would fail."""


class StorageUnavailableError(FatalError):
    """A store the run depends on (database, bucket) is unreachable or misconfigured."""


# --- one item fails for now: retry later ----------------------------------------------------


class RetryableError(RecarchiveError):
    """A transient failure: retrying the same operation may succeed.

    Args:
        message: What failed.
        retry_after: Seconds the server asked us to wait, when it said so.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimitedError(RetryableError):
    """HTTP 429 from the API."""


class ServerError(RetryableError):
    """HTTP 5xx (except 501) from the API or the media host."""


class TransportError(RetryableError):
    """Timeout, reset or refused connection."""


class MediaIntegrityError(RetryableError):
    """Downloaded media is truncated, not MP3, or does not match its expected hash."""


class MediaLinkExpiredError(RetryableError):
    """The presigned media URL answered 403/expired: ask the API for a fresh redirect."""


# --- one item is final ----------------------------------------------------------------------


class TerminalError(RecarchiveError):
    """Final for one item: retrying the same request will not help."""


class NotFoundError(TerminalError):
    """The recording does not exist (HTTP 404): ledger state ``missing``."""


class ClientRequestError(TerminalError):
    """Any other 4xx from the API (e.g. 422 invalid ID), or a request refused before it is sent.

    Args:
        message: What was refused.
        status_code: The API's status; ``None`` when the client refused to send the request
            (an ID that would name another path than a recording's).
    """

    def __init__(self, message: str, *, status_code: int | None) -> None:
        super().__init__(message)
        self.status_code = status_code


class PayloadError(TerminalError):
    """A metadata payload misses a required field or has a value of the wrong type.

    Args:
        message: What is wrong.
        field: The payload field at fault (dotted path, e.g. ``originator.number.number``).
    """

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


class MediaConflictError(TerminalError):
    """The S3 key already holds different bytes; nothing is overwritten."""


class MediaNotAvailableError(TerminalError):
    """The recording has no downloadable media yet (status is not ``available``)."""


class InvalidRedirectError(TerminalError):
    """The API's media redirect is missing, relative, or downgrades https to http."""


# --- our own bookkeeping ----------------------------------------------------------------------


class LedgerStateError(RecarchiveError):
    """A ledger transition that the current state or lease does not allow.

    Raised when the state forbids the move, or when the run does not hold the recording's
    lease (another run took it over).
    """


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """Return the exception a caller of a task group should see.

    ``asyncio.TaskGroup`` wraps failures in an exception group; callers of the pipeline expect
    the error itself (a :class:`FatalError` above all, since it decides the exit code).
    Cancellations of sibling tasks are only consequences and come last.
    """
    leaves: list[BaseException] = []

    def collect(item: BaseException) -> None:
        if isinstance(item, BaseExceptionGroup):
            for inner in item.exceptions:
                collect(inner)
        else:
            leaves.append(item)

    collect(group)
    for kind in (FatalError, RecarchiveError, Exception):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return leaves[0]
