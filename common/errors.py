"""The one exception type for mistakes a user can fix, and how commands report it."""

import sys
from collections.abc import Callable


class UserError(Exception):
    """A user mistake: the message is one line naming the culprit and saying what to do.

    Entry points print it as ``error: <message>`` and exit with status 2, without a traceback.
    """


def exit_status(main: Callable[[], int]) -> int:
    """Run a command's main(); a UserError becomes `error: <message>` on stderr and status 2."""
    try:
        return main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
