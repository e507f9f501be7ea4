"""The analysts' side: the Parquet dataset materialized from SQL, and queries over it."""
