"""One redaction function for every sink: logs, exceptions, ledger, payloads, artifacts.

What counts as a secret (docs/reliability.md, "Secrets"):

* the query string of any URL inside a text (a presigned URL's query *is* a credential), and
  its fragment and user info (``https://user:password@host/…``);
* signature parameters standing alone, outside a full URL (``X-Amz-Signature=…`` in an error
  message that quotes half a URL);
* ``Authorization`` header values;
* the values registered with :func:`register_secret`: the Bird access key, database
  passwords, the PII key. They are registered where settings are loaded
  (:func:`recarchive.config.load_settings`), so every sink of the process knows them.

:func:`redact` is pure and cheap on text without ``://``, ``=`` or a registered secret (one
substring test each), so it can run on every log record and every payload string.
:func:`install_log_redaction` makes every log record of the process pass through it, whatever
handler later writes it (stderr, Prefect's API log handler, pytest's capture).

The registry is process state on purpose: a secret learnt anywhere must be hidden
everywhere, including in records logged by libraries that never see our settings.
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
#: Secrets shorter than this are not registered: masking "a" everywhere would garble text.
MIN_SECRET_LENGTH = 4

#: Registered secrets, an immutable snapshot replaced whole on registration: :func:`redact`
#: iterates it without the lock (iterating a set another thread adds to raises).
_secrets: tuple[str, ...] = ()
_secrets_lock = threading.Lock()

# An absolute URL inside any text: scheme, "://", then anything up to whitespace or a quote.
_URL_RE = re.compile(r"""[A-Za-z][A-Za-z0-9+.\-]{0,15}://[^\s'"<>`\\]+""")
# Credential parameters without their URL (a message that quotes only the query).
# ``name=value`` pairs; a pair is masked when its name ends in a credential word. The name
# starts where no name character precedes it, so each start is tried once: linear in the
# text's length (a suffix match inside the pattern backtracked quadratically).
_PAIR_RE = re.compile(r"""(?<![\w.\-])([\w.\-]+)=([^&\s'"<>]+)""")
_CREDENTIAL_NAMES = (
    "signature",
    "credential",
    "security-token",
    "sig",
    "awsaccesskeyid",
    "accesskey",
    "access_key",
    "token",
    "password",
    "passwd",
    "secret",
)
_AUTH_RE = re.compile(r"(?i)\b(authorization['\"]?\s*[:=]\s*['\"]?)[^'\"\r\n,}]+")


def register_secret(value: str | None) -> None:
    """Mask ``value`` in everything :func:`redact` sees from now on (no-op for short values)."""
    if value is None or len(value) < MIN_SECRET_LENGTH:
        return
    global _secrets
    with _secrets_lock:
        if value not in _secrets:
            _secrets = (*_secrets, value)


def strip_url(url: str) -> str:
    """Return ``url`` without query string, fragment and user info.

    The query string of a presigned URL is a credential; only scheme, host and path are kept.
    """
    cut = url.split("?", 1)[0].split("#", 1)[0]
    if "@" not in cut:
        return cut
    try:
        parts = urlsplit(cut)
        netloc = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        # Unparseable (e.g. a broken IPv6 host): the query is cut already; drop user info.
        scheme, sep, rest = cut.partition("://")
        if not sep:
            return cut
        host, slash, path = rest.partition("/")
        return scheme + sep + host.rsplit("@", 1)[-1] + slash + path


def _strip_match(match: re.Match[str]) -> str:
    return strip_url(match.group(0))


def _mask_credential_pair(match: re.Match[str]) -> str:
    name = match.group(1)
    if name.lower().endswith(_CREDENTIAL_NAMES):
        return f"{name}={MASK}"
    return match.group(0)


def redact(text: str) -> str:
    """Return ``text`` with every credential in it masked or cut (see the module docstring).

    Args:
        text: Any text: a log message, an exception message, a payload string.

    Returns:
        The text with URL queries, fragments and user info cut, credential parameters and
        ``Authorization`` values masked, and registered secrets replaced by ``***``.
    """
    if "://" in text:
        text = _URL_RE.sub(_strip_match, text)
    if "=" in text:
        text = _PAIR_RE.sub(_mask_credential_pair, text)
    if "uthorization" in text or "UTHORIZATION" in text:
        text = _AUTH_RE.sub(lambda match: f"{match.group(1)}{MASK}", text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def describe(exc: BaseException) -> str:
    """``"TypeName: message"`` of an exception, redacted: the one form of ``last_error``."""
    message = str(exc)
    return redact(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)


class RedactingRecordFactory:
    """A log record factory whose records carry only redacted text.

    The message is formatted once and redacted (its arguments dropped), and a traceback is
    formatted and redacted into ``exc_text`` (``exc_info`` dropped), so no handler or
    formatter downstream can render the unredacted exception chain: the cause of one of our
    errors is often a library exception quoting a whole presigned URL.
    """

    def __init__(self, inner: logging._LogRecordFactory) -> None:  # type: ignore[name-defined]
        self.inner = inner

    def __call__(self, *args: object, **kwargs: object) -> logging.LogRecord:
        """Create the record as the wrapped factory does, then redact it."""
        record: logging.LogRecord = self.inner(*args, **kwargs)
        try:
            record.msg = redact(record.getMessage())
            record.args = None
            if record.exc_info:
                record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)))
                record.exc_text = record.exc_text.rstrip("\n")
                record.exc_info = None
        except Exception:
            record.msg = f"<unloggable {type(record.msg).__name__} message>"
            record.args = None
            record.exc_info = None
        return record


_install_lock = threading.Lock()


def install_log_redaction() -> None:
    """Route every log record of the process through :func:`redact` (idempotent)."""
    with _install_lock:
        current = logging.getLogRecordFactory()
        if not isinstance(current, RedactingRecordFactory):
            logging.setLogRecordFactory(RedactingRecordFactory(current))
