"""Client of Bird's recordings API: HTTP transport, request pacing, retries, the 307 redirect."""
