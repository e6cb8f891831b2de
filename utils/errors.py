"""The one exception type for mistakes a user can fix."""


class UserError(Exception):
    """A user mistake: the message is one line naming the culprit and saying what to do.

    Entry points print it as ``error: <message>`` and exit with status 2, without a traceback.
    """
