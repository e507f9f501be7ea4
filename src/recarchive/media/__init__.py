"""Recording media: the transfer from Bird to S3, the object store, keys and verification."""
