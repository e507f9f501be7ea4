"""Which recordings a run is about: ID lists read from files, windows, discovery."""
