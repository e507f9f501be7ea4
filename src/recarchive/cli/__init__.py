"""The command line: the typer app, its progress display and the demo (see ARCHITECTURE.md)."""

from recarchive.export.memory import prefer_system_allocator

prefer_system_allocator()  # before pyarrow's first import (see there)
