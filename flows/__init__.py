"""Prefect flows of recarchive: thin wrappers over :mod:`recarchive.runner` and the pipeline."""
