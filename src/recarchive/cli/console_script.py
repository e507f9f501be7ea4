"""The ``recarchive`` console script: the command line, then the process ends at once.

Apart from :func:`recarchive.cli.app.main`, which scripts and tests call in processes of their
own and go on after it: :func:`console` ends the process
(:func:`~recarchive.cli.output.exit_without_teardown`).
"""

from __future__ import annotations

from typing import NoReturn

from recarchive.cli.app import main
from recarchive.cli.output import exit_without_teardown


def console() -> NoReturn:
    """Run the command, then end the process with its exit status.

    An exception other than ``SystemExit`` (Ctrl-C's ``KeyboardInterrupt``) takes Python's
    ordinary way out.
    """
    try:
        main()
    except SystemExit as done:
        exit_without_teardown(done.code)
    exit_without_teardown(0)
