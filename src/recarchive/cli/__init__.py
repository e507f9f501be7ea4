"""The command line: the typer app, its progress display and the demo (see ARCHITECTURE.md)."""
