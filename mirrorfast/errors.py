"""The one exception type users see (a one-line message, printed by the CLI, exit code 2), and the CLI's
SIGTERM: `Terminated`, raised for the duration of `sigterm_unwinds`, with the checkpoint that stops a job even
where Python swallowed it."""

import contextlib
import numbers
import os
import signal
import sys
import threading
from typing import Iterator


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


def _raise_terminated_outside_imports(signum=None, frame=None) -> None:
    """raise_terminated, except in the middle of an import: a native module that runs Python code while it loads
    (Triton's, through nanobind) aborts the whole process on an exception raised there (seen: SIGABRT, the
    temporary folder left behind). Then the signal comes again 0.1 s later, until the import is over."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            retry = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM))
            retry.daemon = True
            retry.start()
            return
        frame = frame.f_back
    raise_terminated()


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """For the body (call from the main thread): SIGTERM raises Terminated where the main thread is, so a job
    stopped by a container or a scheduler unwinds through its `with` / `finally` blocks as on Ctrl-C. A
    Terminated raised inside a __del__ or weakref callback, which Python prints and drops, is not printed:
    the checkpoints (`stop_if_terminated`: each training step, every output's move into place, the body's
    end) act on it. The `mirrorfast` commands and the benchmark scripts run under it."""
    reset_termination()
    previous = signal.signal(signal.SIGTERM, _raise_terminated_outside_imports)
    default_hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: (
        None if isinstance(unraisable.exc_value, Terminated) else default_hook(unraisable))
    try:
        yield
        stop_if_terminated()  # a job that finished with its SIGTERM swallowed still ends as terminated
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = default_hook
        reset_termination()
