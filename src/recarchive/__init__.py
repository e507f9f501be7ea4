"""recarchive: archive Bird call recordings (metadata to SQL and Parquet, MP3s to S3) once."""
