"""Alembic migrations of the recarchive schema, run programmatically by ``upgrade_database``."""
