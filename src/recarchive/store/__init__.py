"""SQL, the source of truth: engine and schema, recordings, the ledger, runs, listed windows."""
