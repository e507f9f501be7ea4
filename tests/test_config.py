"""Settings: defaults, validation errors naming the variable, secrets kept out of output."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from recarchive.cli.app import app
from recarchive.config import Settings, load_settings
from recarchive.errors import ConfigError

SECRET = "sk-live-very-secret-value"
VALID_ID = "123e4567-e89b-12d3-a456-426614174000"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("RECARCHIVE_"):
            monkeypatch.delenv(name)


def test_contract_defaults() -> None:
    settings = load_settings()
    assert settings.bird_api_url == "https://api.bird.com"
    assert settings.bird_auth_scheme == "AccessKey"
    assert settings.database_url == "sqlite:///recarchive-data/archive.db"
    assert settings.parquet_root == "recarchive-data/parquet"
    assert settings.s3_prefix == "recordings"
    assert settings.s3_endpoint_url is None
    assert settings.s3_sse is None
    assert settings.s3_bucket is None


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECARCHIVE_BIRD_AUTH_SCHEME", "Bearer")
    monkeypatch.setenv("RECARCHIVE_S3_PREFIX", "/calls/")
    monkeypatch.setenv("RECARCHIVE_S3_SSE", "aws:kms")
    monkeypatch.setenv("RECARCHIVE_BIRD_API_URL", "http://127.0.0.1:9/")
    settings = load_settings()
    assert settings.bird_auth_scheme == "Bearer"
    assert settings.s3_prefix == "calls"
    assert settings.s3_sse == "aws:kms"
    assert settings.bird_api_url == "http://127.0.0.1:9"


def test_flag_overrides_beat_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECARCHIVE_CHUNK_SIZE", "100")
    assert load_settings(chunk_size=7).chunk_size == 7
    assert load_settings(chunk_size=None).chunk_size == 100


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("RECARCHIVE_BIRD_AUTH_SCHEME", "Basic", "RECARCHIVE_BIRD_AUTH_SCHEME"),
        ("RECARCHIVE_S3_SSE", "rot13", "RECARCHIVE_S3_SSE"),
        ("RECARCHIVE_CONCURRENCY", "many", "RECARCHIVE_CONCURRENCY"),
        ("RECARCHIVE_CONCURRENCY", "0", "RECARCHIVE_CONCURRENCY"),
        ("RECARCHIVE_BIRD_API_URL", "api.bird.com", "RECARCHIVE_BIRD_API_URL"),
        ("RECARCHIVE_S3_ENDPOINT_URL", "localhost:9000", "RECARCHIVE_S3_ENDPOINT_URL"),
        ("RECARCHIVE_RATE_LIMIT_BATCH", "51", "at most RECARCHIVE_REQUESTS_PER_SECOND \\(50\\)"),
    ],
    ids=[
        "scheme",
        "sse",
        "not-int",
        "zero",
        "url-no-scheme",
        "endpoint-no-scheme",
        "batch-over-the-rate",
    ],
)
def test_invalid_setting_names_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=message):
        load_settings()


def test_required_settings_checked_where_needed() -> None:
    settings = load_settings()
    with pytest.raises(ConfigError, match="RECARCHIVE_BIRD_ACCESS_KEY, RECARCHIVE_WORKSPACE_ID"):
        settings.require_bird()
    with pytest.raises(ConfigError, match="RECARCHIVE_S3_BUCKET"):
        settings.require_bucket()


def test_access_key_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECARCHIVE_BIRD_ACCESS_KEY", SECRET)
    settings = Settings()
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings.model_dump())
    key = settings.bird_access_key
    assert key is not None and key.get_secret_value() == SECRET


def test_invalid_secret_value_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECARCHIVE_CONCURRENCY", SECRET)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    ("env", "args", "expected"),
    [
        ({}, ["archive", VALID_ID], "RECARCHIVE_BIRD_ACCESS_KEY"),
        (
            {"RECARCHIVE_BIRD_ACCESS_KEY": SECRET, "RECARCHIVE_WORKSPACE_ID": "ws"},
            ["archive", VALID_ID],
            "RECARCHIVE_S3_BUCKET",
        ),
        (
            {"RECARCHIVE_BIRD_AUTH_SCHEME": "Basic"},
            ["archive", VALID_ID],
            "RECARCHIVE_BIRD_AUTH_SCHEME",
        ),
        (
            {"RECARCHIVE_BIRD_ACCESS_KEY": SECRET, "RECARCHIVE_WORKSPACE_ID": "ws"},
            ["archive", "--skip-media", "not-a-uuid", VALID_ID],
            "argument:1: 'not-a-uuid'",
        ),
        (
            {"RECARCHIVE_BIRD_ACCESS_KEY": SECRET, "RECARCHIVE_WORKSPACE_ID": "ws"},
            ["archive", "--skip-media"],
            "no IDs given",
        ),
        (
            {"RECARCHIVE_BIRD_ACCESS_KEY": SECRET, "RECARCHIVE_WORKSPACE_ID": "ws"},
            ["archive", "--skip-media", "--since", "yesterday"],
            "--since: 'yesterday'",
        ),
        (
            {"RECARCHIVE_BIRD_ACCESS_KEY": SECRET, "RECARCHIVE_WORKSPACE_ID": "ws"},
            ["archive", "--skip-media", "--since", "2026-02-01", "--until", "2026-01-01"],
            "must be after",
        ),
    ],
    ids=["no-key", "no-bucket", "bad-scheme", "invalid-id", "no-ids", "bad-date", "empty-window"],
)
def test_cli_usage_errors_exit_2_without_traceback(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], args: list[str], expected: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    assert SECRET not in result.output


def test_every_command_has_help() -> None:
    runner = CliRunner()
    for command in (
        "archive",
        "status",
        "retry-failed",
        "verify",
        "export",
        "query",
        "simulate",
        "demo",
        "db",
    ):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Usage" in result.output


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:pw1@h:5432/db", "postgresql://u:***@h:5432/db"),
        (
            "postgresql://u@h/db?password=pw1&sslmode=require",
            "postgresql://u@h/db?password=***&sslmode=***",
        ),
        ("sqlite:///recarchive-data/archive.db", "sqlite:///recarchive-data/archive.db"),
    ],
)
def test_database_urls_are_shown_without_credentials(url: str, shown: str) -> None:
    from recarchive.run.database import safe_database_url

    assert safe_database_url(url) == shown
    assert "pw1" not in safe_database_url(url)


@pytest.mark.parametrize(
    ("variable", "url"),
    [
        pytest.param("bird_api_url", "https://user:s3cret-pw@api.bird.com", id="api-user-password"),
        pytest.param("bird_api_url", "http://s3cret-pw@127.0.0.1:9", id="api-user-only"),
        pytest.param("s3_endpoint_url", "http://key:s3cret-pw@127.0.0.1:9000", id="s3-endpoint"),
    ],
)
def test_urls_with_credentials_are_refused_without_showing_them(variable: str, url: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(**{variable: url})
    assert "must not hold a user name or password" in str(refused.value)
    assert "s3cret-pw" not in str(refused.value)


def test_urls_without_credentials_are_taken() -> None:
    # The control: an @ in the path is not user info.
    settings = load_settings(bird_api_url="https://api.bird.com/a@b", s3_endpoint_url="http://h:9")
    assert settings.bird_api_url == "https://api.bird.com/a@b"


@pytest.mark.parametrize(
    "url", ["https://api.bird.com/?v=1", "https://api.bird.com#x"], ids=["query", "fragment"]
)
def test_an_api_url_with_a_query_or_fragment_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="must not have a query or fragment"):
        load_settings(bird_api_url=url)


@pytest.mark.parametrize(
    "workspace", [".", "..", " .. ", "a/b", "/"], ids=["dot", "dot-dot", "spaced", "slash", "root"]
)
def test_a_workspace_id_that_is_a_dot_segment_is_refused(workspace: str) -> None:
    # httpx resolves .../workspaces/../recordings/ID to /recordings/ID: the key would go there.
    with pytest.raises(ConfigError, match="must name a workspace"):
        load_settings(workspace_id=workspace)
    assert load_settings(workspace_id="..ws").workspace_id == "..ws"  # the control
