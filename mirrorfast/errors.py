"""The one exception type users see: a one-line message, printed by the CLI, exit code 2."""


class MirrorfastError(Exception):
    """A user-facing failure (bad input, missing file, unusable model). The message is the whole story."""
