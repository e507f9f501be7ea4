"""Stores of recarchive: SQL (source of truth and ledger), Parquet export, S3 media.

* :mod:`recarchive.store.sql` — engine setup, Alembic upgrades, upserts, ledger, runs.
* :mod:`recarchive.store.tables` — the SQLAlchemy Core tables (mirrored by ``sql/``).
* :mod:`recarchive.store.parquet` — export of changed monthly partitions from SQL.
* :mod:`recarchive.store.s3` — media objects over an injected boto3 client.
"""
