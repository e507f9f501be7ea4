"""Settings from ``RECARCHIVE_*`` environment variables (and CLI flags).

Settings are built once, in the CLI or a flow, and passed down; no module reads the
environment on import. The access key is a :class:`~pydantic.SecretStr`, so it never shows
in a repr, a log line or an exception message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from recarchive.errors import ConfigError
from recarchive.redaction import install_log_redaction, register_secret

ENV_PREFIX = "RECARCHIVE_"

AuthScheme = Literal["AccessKey", "Bearer"]
ServerSideEncryption = Literal["AES256", "aws:kms"]
ChecksumMode = Literal["when_supported", "when_required"]
#: What the Parquet dataset shows of callers (recarchive.export.pii).
ParquetPii = Literal["raw", "hash", "drop"]
#: Shortest ``RECARCHIVE_PII_KEY``: the hashes hide phone numbers, a space small enough to
#: enumerate, so the key's secrecy is all that protects them; 32 characters is what a
#: 128-bit random key takes in hex (``openssl rand -hex 16``), the least that resists a search.
MIN_PII_KEY_LENGTH = 32
LogFormat = Literal["text", "json"]
ObjectLockMode = Literal["GOVERNANCE", "COMPLIANCE"]
#: Storage classes an MP3 may be written in (S3's names; GLACIER and DEEP_ARCHIVE need a
#: restore before a read, see ``verify --deep --restore``).
StorageClass = Literal[
    "STANDARD",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER_IR",
    "GLACIER",
    "DEEP_ARCHIVE",
]


class Settings(BaseSettings):
    """Every setting of recarchive; field ``x`` is read from ``RECARCHIVE_X``.

    The fields of the external contract (the README's Configuration) come first; tuning knobs
    follow. ``bird_access_key``, ``workspace_id`` and ``s3_bucket`` are contractually required,
    but only by the commands that use them: :meth:`require_bird` and :meth:`require_bucket`
    check them where they are needed, so ``recarchive query`` works without a key.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        validate_default=True,
        hide_input_in_errors=True,
    )

    # --- contract ------------------------------------------------------------------------
    bird_api_url: str = "https://api.bird.com"
    bird_access_key: SecretStr | None = None
    bird_auth_scheme: AuthScheme = "AccessKey"
    workspace_id: str | None = None
    database_url: str = "sqlite:///recarchive-data/archive.db"
    parquet_root: str = "recarchive-data/parquet"
    s3_bucket: str | None = None
    s3_prefix: str = "recordings"
    s3_endpoint_url: str | None = None
    s3_sse: ServerSideEncryption | None = None
    media_max_bytes: int = Field(default=4 * 1024**3, ge=1)
    metadata_max_bytes: int = Field(default=4 * 1024**2, ge=1024)
    media_low_speed_bytes: int = Field(default=1024, ge=0)
    media_low_speed_seconds: float = Field(default=60.0, gt=0)
    #: Comma-separated host names or addresses (see :attr:`media_allowed_host_set`).
    media_allowed_hosts: str | None = None
    # Privacy-aware analyst data (issue 14): raw, hash or drop the callers' columns in Parquet.
    parquet_pii: ParquetPii = "raw"
    pii_key: SecretStr | None = None
    # Retention locks and storage classes (issue 14): a lock mode and its days go together;
    # retain-until is createdAt + days. The storage class applies to MP3s only.
    s3_object_lock_mode: ObjectLockMode | None = None
    s3_retention_days: int | None = Field(default=None, ge=1, le=36_500)
    s3_storage_class: StorageClass | None = None

    # --- tuning --------------------------------------------------------------------------
    s3_sse_kms_key_id: str | None = None
    s3_request_checksum_calculation: ChecksumMode = "when_supported"
    s3_multipart_threshold_bytes: int = Field(default=64 * 1024 * 1024, ge=5 * 1024 * 1024)
    s3_multipart_chunk_bytes: int = Field(default=16 * 1024 * 1024, ge=5 * 1024 * 1024)
    requests_per_second: float = Field(default=50.0, gt=0)
    # One limit for every process on this ledger database (store/permits.py), not per process.
    rate_limit_shared: bool = False
    # Permits taken from the shared limit at once; 0: a tenth of a second's worth.
    rate_limit_batch: int = Field(default=0, ge=0, le=10_000)
    concurrency: int = Field(default=16, ge=1, le=512)
    chunk_size: int = Field(default=500, ge=1, le=100_000)
    http_timeout_seconds: float = Field(default=30.0, gt=0)
    http_max_attempts: int = Field(default=6, ge=1, le=50)
    http_max_retry_seconds: float = Field(default=300.0, gt=0)
    lease_seconds: int = Field(default=900, ge=10)
    item_max_attempts: int = Field(default=8, ge=1)
    temp_dir: str | None = None

    # --- insight (issue 15): monitoring and logs -----------------------------------------
    #: A Prometheus textfile written at the end of each run (run/metrics.py); unset: none.
    metrics_file: str | None = None
    #: ``text`` (default) or ``json``: one JSON object per log line (cli/logs.py).
    log_format: LogFormat = "text"

    @field_validator("bird_api_url", "s3_endpoint_url")
    @classmethod
    def _absolute_http_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None if value == "" else value
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an absolute http:// or https:// URL")
        if "@" in value.split("/", 3)[2]:
            # httpx would send it as Basic auth in place of the access key, and every URL
            # (logs, errors) would carry it.
            raise ValueError("must not hold a user name or password")
        if "?" in value or "#" in value:
            # Paths are appended to it: they would land in the query or fragment.
            raise ValueError("must not have a query or fragment")
        return value.rstrip("/")

    @field_validator("s3_prefix")
    @classmethod
    def _strip_slashes(cls, value: str) -> str:
        return value.strip("/")

    # Deployment templates often export optional variables as empty strings.
    @field_validator(
        "bird_access_key",
        "workspace_id",
        "s3_bucket",
        "s3_endpoint_url",
        "s3_sse",
        "s3_sse_kms_key_id",
        "temp_dir",
        "media_allowed_hosts",
        "metrics_file",
        "s3_object_lock_mode",
        "s3_retention_days",
        "s3_storage_class",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("workspace_id")
    @classmethod
    def _a_path_segment(cls, value: str | None) -> str | None:
        if value is not None and (value.strip() in ("", ".", "..") or "/" in value):
            # Every request goes to .../workspaces/{id}/...: "." and ".." would send the
            # access key to another path of the API host. A "/" would put the media under
            # another workspace's S3 prefix ({prefix}/{workspace}/...), where its rebuild
            # lists them.
            raise ValueError("must name a workspace: not '.', '..' or a value with '/'")
        return value

    @field_validator("temp_dir")
    @classmethod
    def _existing_folder(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_dir():
            raise ValueError(f"{value!r} is not an existing folder")
        return value

    @field_validator("parquet_pii", mode="before")
    @classmethod
    def _pii_mode(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value.strip().lower() or "raw"
        return value

    @field_validator("pii_key", mode="before")
    @classmethod
    def _pii_key_long_enough(cls, value: Any) -> Any:
        secret = value.get_secret_value() if isinstance(value, SecretStr) else value
        if secret == "":
            return None
        # The message never quotes the value: it is a secret.
        if isinstance(secret, str) and len(secret) < MIN_PII_KEY_LENGTH:
            raise ValueError(
                f"must be at least {MIN_PII_KEY_LENGTH} characters, e.g. "
                "`openssl rand -hex 32` (it is all that keeps hashed phone numbers unreadable)"
            )
        return value

    @model_validator(mode="after")
    def _pii_key_with_hash(self) -> Settings:
        if self.parquet_pii == "hash" and self.pii_key is None:
            raise ValueError(
                "RECARCHIVE_PARQUET_PII=hash needs RECARCHIVE_PII_KEY (a secret of at least "
                f"{MIN_PII_KEY_LENGTH} characters, e.g. `openssl rand -hex 32`)"
            )
        return self

    @model_validator(mode="after")
    def _batch_within_the_rate(self) -> Settings:
        # A batch reserves batch/rate seconds of the shared schedule for one process: more
        # than a second's worth would hold every other process back that long.
        if self.rate_limit_batch > max(1.0, self.requests_per_second):
            raise ValueError(
                "RECARCHIVE_RATE_LIMIT_BATCH must be at most RECARCHIVE_REQUESTS_PER_SECOND "
                f"({self.requests_per_second:g}), not {self.rate_limit_batch}"
            )
        return self

    @model_validator(mode="after")
    def _lock_mode_with_days(self) -> Settings:
        # Retention is createdAt + days: a mode without days would fall back to the bucket's
        # default retention, counted from the upload instead; days without a mode lock nothing.
        mode, days = env_name("s3_object_lock_mode"), env_name("s3_retention_days")
        if self.s3_object_lock_mode is not None and self.s3_retention_days is None:
            raise ValueError(f"{mode} is set but {days} is not: set both, or neither")
        if self.s3_retention_days is not None and self.s3_object_lock_mode is None:
            raise ValueError(f"{days} is set but {mode} is not: set both, or neither")
        return self

    @property
    def rate_limit_batch_size(self) -> int:
        """Permits per take from the shared limit: the setting, or a tenth of a second's."""
        return self.rate_limit_batch or max(1, round(self.requests_per_second / 10))

    @property
    def media_allowed_host_set(self) -> frozenset[str]:
        """``RECARCHIVE_MEDIA_ALLOWED_HOSTS`` as a set of lower-case hosts."""
        raw = self.media_allowed_hosts or ""
        return frozenset(host.strip().lower() for host in raw.split(",") if host.strip())

    def require_bird(self) -> tuple[str, SecretStr]:
        """Return ``(workspace_id, access_key)`` or fail naming the missing variable.

        Raises:
            ConfigError: ``RECARCHIVE_WORKSPACE_ID`` or ``RECARCHIVE_BIRD_ACCESS_KEY`` unset.
        """
        missing = [
            env_name(name)
            for name, value in (
                ("bird_access_key", self.bird_access_key),
                ("workspace_id", self.workspace_id),
            )
            if value is None
        ]
        if missing:
            raise ConfigError(f"missing required setting: {', '.join(missing)}")
        assert self.workspace_id is not None and self.bird_access_key is not None
        return self.workspace_id, self.bird_access_key

    def require_bucket(self) -> str:
        """Return the media bucket or fail naming ``RECARCHIVE_S3_BUCKET``.

        Raises:
            ConfigError: The bucket is unset.
        """
        if not self.s3_bucket:
            raise ConfigError(
                f"missing required setting: {env_name('s3_bucket')} "
                "(needed to archive media; pass --skip-media to fetch metadata only)"
            )
        return self.s3_bucket


def env_name(field: str) -> str:
    """Return the environment variable that sets ``field``.

    ``workspace_id`` gives ``RECARCHIVE_WORKSPACE_ID``.
    """
    return f"{ENV_PREFIX}{field.upper()}"


def load_settings(**overrides: Any) -> Settings:
    """Build :class:`Settings` from the environment, with CLI flag ``overrides`` on top.

    Args:
        **overrides: Field values from CLI flags; ``None`` values are ignored.

    Returns:
        The validated settings.

    Raises:
        ConfigError: One line per invalid setting, naming its environment variable; the
            offending value is not echoed (it may be a secret).
    """
    install_log_redaction()
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            if not error["loc"]:  # a check across settings names its variables itself
                lines.append(message)
                continue
            field = ".".join(str(part) for part in error["loc"])
            lines.append(f"{env_name(field)}: {message}")
        raise ConfigError("invalid settings: " + "; ".join(lines)) from exc
    register_settings_secrets(settings)
    return settings


def register_settings_secrets(settings: Settings) -> None:
    """Tell :mod:`recarchive.redaction` the secrets of ``settings``, so no sink shows them.

    The access key, the PII key, and the password of the database URL (in its user info or
    its query).
    """
    # SQLAlchemy's URL parser, imported here: ``recarchive query`` never needs SQLAlchemy.
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if settings.bird_access_key is not None:
        register_secret(settings.bird_access_key.get_secret_value())
    if settings.pii_key is not None:
        register_secret(settings.pii_key.get_secret_value())
    try:
        url = make_url(settings.database_url)
    except ArgumentError:
        return
    register_secret(url.password if isinstance(url.password, str) else None)
    for name, value in url.query.items():
        if "pass" in name.lower() or "secret" in name.lower():
            for item in (value,) if isinstance(value, str) else value:
                register_secret(item)
