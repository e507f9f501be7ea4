"""Alembic environment: runs on the connection that ``upgrade_database`` passes in.

There is no alembic.ini at runtime; ``recarchive.store.engine.upgrade_database`` builds the
config and hands over an open connection in ``config.attributes["connection"]``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from recarchive.store.tables import metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things: later revisions use batch mode there.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run migrations through recarchive.store.engine.upgrade_database")
    _run(connection)


_main()
