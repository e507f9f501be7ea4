"""``RECARCHIVE_LOG_FORMAT=json``: one JSON object per line, redacted, and bad values exit 2."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recarchive.cli.app import app
from recarchive.cli.logs import JsonFormatter, apply_log_format
from recarchive.cli.output import configure_logging
from recarchive.config import load_settings

ACCESS_KEY = "sk-json-log-secret-0123456789"


@pytest.fixture
def json_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The CLI's logging set up as a command does, in JSON, into a buffer."""
    monkeypatch.setenv("RECARCHIVE_BIRD_ACCESS_KEY", ACCESS_KEY)
    monkeypatch.setenv("RECARCHIVE_LOG_FORMAT", "json")
    buffer = io.StringIO()
    monkeypatch.setattr("sys.stderr", buffer)
    configure_logging(True)
    settings = load_settings()  # registers the access key and installs the redaction
    apply_log_format(settings.log_format)
    yield buffer
    configure_logging(False)


def lines(buffer: io.StringIO) -> list[dict[str, str]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_one_redacted_json_object_per_line(json_log: io.StringIO) -> None:
    logger = logging.getLogger("recarchive.test")
    logger.warning("rejected key %s\nsecond line", ACCESS_KEY)
    try:
        raise ValueError(f"Bird said no to {ACCESS_KEY}")
    except ValueError:
        logger.exception("request failed")
    logging.getLogger("recarchive.other").info(
        "fetched https://media.example/a.mp3?X-Amz-Signature=abc123"
    )
    first, second, third = lines(json_log)
    assert set(first) == {"time", "level", "logger", "message"}
    assert first["level"] == "WARNING" and first["logger"] == "recarchive.test"
    assert first["message"] == "rejected key ***\nsecond line"  # a newline stays inside
    moment = datetime.fromisoformat(first["time"])
    assert moment.tzinfo == UTC and abs((datetime.now(UTC) - moment).total_seconds()) < 60
    assert first["time"].endswith("Z")
    assert second["message"] == "request failed"
    assert "ValueError: Bird said no to ***" in second["exception"]
    assert "Traceback" in second["exception"]
    assert third["message"] == "fetched https://media.example/a.mp3"
    assert ACCESS_KEY not in json_log.getvalue() and "abc123" not in json_log.getvalue()


def test_the_formatter_redacts_a_record_the_factory_never_saw() -> None:
    # A record built by hand (not through the redacting record factory): still masked.
    load_settings(bird_access_key=ACCESS_KEY)
    try:
        raise RuntimeError(ACCESS_KEY)
    except RuntimeError as exc:
        record = logging.LogRecord(
            "lib", logging.ERROR, __file__, 1, "got %s", (ACCESS_KEY,), (type(exc), exc, None)
        )
    line = JsonFormatter().format(record)
    assert ACCESS_KEY not in line
    assert json.loads(line)["message"] == "got ***"
    assert "RuntimeError: ***" in json.loads(line)["exception"]


def test_text_stays_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECARCHIVE_LOG_FORMAT", raising=False)
    buffer = io.StringIO()
    monkeypatch.setattr("sys.stderr", buffer)
    configure_logging(False)
    apply_log_format(load_settings().log_format)
    logging.getLogger("recarchive.test").warning("plain")
    assert buffer.getvalue() == "WARNING recarchive.test: plain\n"


@pytest.mark.parametrize("command", [["status"], ["archive", "--json", "--since", "2025-01-01"]])
def test_an_invalid_log_format_exits_2_before_anything(tmp_path: Path, command: list[str]) -> None:
    database = tmp_path / "archive.db"
    env = {
        "RECARCHIVE_LOG_FORMAT": "yaml",
        "RECARCHIVE_DATABASE_URL": f"sqlite:///{database}",
        "RECARCHIVE_BIRD_ACCESS_KEY": "k" * 10,
        "RECARCHIVE_WORKSPACE_ID": "ws",
        "RECARCHIVE_BIRD_API_URL": "http://127.0.0.1:9",
    }
    result = CliRunner().invoke(app, command, env=env)
    assert result.exit_code == 2
    assert "RECARCHIVE_LOG_FORMAT" in result.stderr and result.stdout == ""
    assert not database.exists()
