"""The one exception type users see: its message is the whole one-line error, so it must name the file and problem."""


class QtoolError(Exception):
    """A problem with the user's input or environment, reported as `error: <message>` and exit code 1."""


class UsageError(QtoolError):
    """Bad command-line usage; exit code 2."""
