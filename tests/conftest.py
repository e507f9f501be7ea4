"""Shared pytest configuration: the real servers the suite starts on loopback.

Each fixture module owns one server: the Bird simulator, the hostile HTTP server, moto's S3
server, SeaweedFS's S3 gateway, PostgreSQL; and a SQLite file database.
In CI (``CI=true``) a fixture whose server cannot start fails the test; it never skips.
"""

pytest_plugins = [
    "tests.fixtures.simulator",
    "tests.fixtures.s3",
    "tests.fixtures.postgres",
    # After postgres: it imports that module's free-port helper, which must be loaded (and
    # assertion-rewritten) as a plugin first.
    "tests.fixtures.seaweedfs",
    "tests.fixtures.hostile",
    "tests.fixtures.prefect",
    "tests.fixtures.sqlite",
]
