"""Opening the SQL store from :class:`~recarchive.config.Settings`.

Apart from :mod:`~recarchive.run.clients` so that the commands that need only SQL
(``status``, ``export``, ``migrate``) do not import the HTTP and S3 stacks: aiohttp, httpx and
the Bird client cost ~0.8 s of CPU at start-up (``cProfile`` of ``recarchive export``,
docs/benchmarks.md).
"""

from __future__ import annotations

from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from recarchive.config import Settings
from recarchive.errors import ConfigError, StorageUnavailableError
from recarchive.store.archive import ArchiveStore
from recarchive.store.engine import create_engine_for, upgrade_database


def safe_database_url(url: str) -> str:
    """Return ``url`` with any password masked, for messages and logs."""
    try:
        parsed = make_url(url)
        # Query parameters can carry credentials too (``?password=``, ``sslpassword``):
        # keep their names, never their values.
        base = parsed.set(query={}).render_as_string(hide_password=True)
        query = "&".join(f"{key}=***" for key in parsed.query)
        return f"{base}?{query}" if query else base
    except ArgumentError:
        return "<unparseable database URL>"


def open_store(settings: Settings) -> tuple[Engine, ArchiveStore]:
    """Create the engine, upgrade the schema in place, and return the store.

    Raises:
        ConfigError: ``RECARCHIVE_DATABASE_URL`` is not a usable SQLAlchemy URL.
        StorageUnavailableError: The database cannot be reached or upgraded.
    """
    try:
        engine = create_engine_for(settings.database_url)
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(
            f"RECARCHIVE_DATABASE_URL: not a usable database URL "
            f"({safe_database_url(settings.database_url)})"
        ) from exc
    try:
        upgrade_database(engine)
    except SQLAlchemyError as exc:
        engine.dispose()
        raise StorageUnavailableError(
            f"cannot open the database {safe_database_url(settings.database_url)}: "
            f"{type(exc).__name__}"
        ) from exc
    return engine, ArchiveStore(engine)
