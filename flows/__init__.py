"""Prefect flows of recarchive: thin wrappers over :mod:`recarchive.run.runs` and the pipeline."""
