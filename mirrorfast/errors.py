"""The one exception type users see: a one-line message, printed by the CLI, exit code 2."""


class MirrorfastError(Exception):
    """A user-facing failure (bad input, missing file, unusable model). The message is the whole story."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name): what a one-line error can quote."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
