"""A PostgreSQL server for a benchmark: the one given, or a throwaway one (``auto``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def postgres_server(url: str) -> Iterator[str]:
    """Yield ``url``; for ``auto``, start a throwaway server, yield its URL, then stop it.

    Raises:
        SystemExit: ``auto`` without the PostgreSQL binaries.
    """
    if url != "auto":
        yield url
        return
    from tests.fixtures.postgres import PostgresServer, find_pg_bin

    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise SystemExit("PostgreSQL binaries not found: ./scripts/bootstrap --postgres")
    server = PostgresServer(bin_dir)
    try:
        yield server.start()
    finally:
        server.stop()
