"""The Parquet export a run ends with, and ``recarchive export``, from the settings.

Apart from :mod:`~recarchive.run.runs` so that ``recarchive export`` does not import the
archive pipeline (Bird client, aiohttp, the media path) only to write Parquet.
"""

from __future__ import annotations

from sqlalchemy import Engine

from recarchive.config import Settings
from recarchive.export.parquet import ExportReport, export_changed
from recarchive.export.pii import PiiPolicy


def export_parquet(settings: Settings, engine: Engine, *, full: bool = False) -> ExportReport:
    """Rewrite the Parquet partitions changed since the last export."""
    return export_changed(
        engine,
        settings.parquet_root,
        s3_endpoint_url=settings.s3_endpoint_url,
        full=full,
        pii=PiiPolicy.from_settings(settings),
    )
