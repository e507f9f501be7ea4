"""``RECARCHIVE_LOG_FORMAT=json``: one JSON object per log line, for log shippers.

Keys (README, "Logs"): ``time`` (UTC, ISO 8601 with milliseconds and ``Z``), ``level``,
``logger``, ``message``, and ``exception`` (the formatted traceback) when the record has one.
The text is what :class:`recarchive.redaction.RedactingRecordFactory` left in the record (the
message already redacted, the traceback formatted and redacted into ``exc_text``); it is
redacted once more here, so a record made before the factory was installed is safe too.
"""

from __future__ import annotations

import json
import logging
import traceback
from datetime import UTC, datetime

from recarchive.config import LogFormat
from recarchive.redaction import redact


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON (never more: newlines are escaped by JSON)."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as a compact JSON object."""
        moment = datetime.fromtimestamp(record.created, UTC)
        line: dict[str, str] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        exception = record.exc_text
        if exception is None and record.exc_info:
            exception = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if exception:
            line["exception"] = redact(exception)
        if record.stack_info:
            line["stack"] = redact(record.stack_info)
        return json.dumps(line, ensure_ascii=False)


def apply_log_format(log_format: LogFormat) -> None:
    """Give every handler of the root logger the formatter of ``log_format``.

    Called once the settings are loaded (``configure_logging`` runs before, with the text
    format, so an invalid setting is reported like any other: exit 2).
    """
    if log_format != "json":
        return
    formatter = JsonFormatter()
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
