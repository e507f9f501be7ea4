"""Prefect flows of recarchive: thin wrappers over :mod:`recarchive.run.runs` and the pipeline."""

from recarchive.export.memory import prefer_system_allocator

prefer_system_allocator()  # before pyarrow's first import (see there)
