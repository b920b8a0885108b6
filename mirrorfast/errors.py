"""The one exception type users see (a one-line message, printed by the CLI, exit code 2), and the CLI's
SIGTERM: `Terminated`, with the checkpoint that stops a job even where Python swallowed it."""

import numbers
import os
import threading


class MirrorfastError(Exception):
    """A user-facing failure (bad input, missing file, unusable model). The message is the whole story."""


def check_flag(name: str, value) -> bool:
    """An API on/off argument: True or False only (a string such as "no" is truthy)."""
    if not isinstance(value, bool):
        raise MirrorfastError(f"{name} must be True or False, got {value!r}")
    return value


def check_integer(name: str, value) -> int:
    """An API integer argument (numpy's too, returned as int): 8.5, "8" or True is an error, not silently 8."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise MirrorfastError(f"{name} must be an integer, got {value!r}")
    return int(value)


def check_path(name: str, value) -> None:
    """An API path argument: a str or os.PathLike (None or a number gave os.fspath's TypeError)."""
    if not isinstance(value, (str, os.PathLike)):
        raise MirrorfastError(f"{name} must be a path (str or os.PathLike), got {value!r}")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name): what a one-line error can quote."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Terminated(BaseException):
    """SIGTERM, raised where the main thread is (`raise_terminated`, the CLI's handler), so that the job unwinds
    as on Ctrl-C (a container stop or a scheduler's kill leaves no temporary output behind) instead of the
    process dying mid-write."""


_sigterm_received = threading.Event()


def raise_terminated(_signum=None, _frame=None) -> None:
    """The CLI's SIGTERM handler. It also remembers the signal: Python runs handlers between bytecodes, and one
    that runs inside a weakref callback or a __del__ (the import system's module-lock callback, under load)
    has its exception printed as "Exception ignored" and dropped, so the job would go on and finish."""
    _sigterm_received.set()
    raise Terminated


def reset_termination() -> None:
    _sigterm_received.clear()


def stop_if_terminated() -> None:
    """A checkpoint (each training step, and before a finished output is moved into place): raises Terminated
    if a SIGTERM came, whether or not its own exception got through, so a terminated job never writes."""
    if _sigterm_received.is_set():
        raise Terminated
