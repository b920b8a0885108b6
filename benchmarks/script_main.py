"""How the benchmark scripts end: one line on stderr and an exit code, never a traceback, for bad input and signals.

`run_main(main, prog)` runs main() with SIGTERM raising mirrorfast's Terminated, as the `mirrorfast` commands do,
so that a stopped run (`timeout`, a scheduler, the device tool) unwinds through its `with` / `finally` blocks and
removes its temporary folders and server subprocesses, then exits 143; Ctrl-C the same with 130; a MirrorfastError
(bad input the package found, e.g. a folder that is not an export) is `PROG: error: ...` and exit 2.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from from_checkout import ensure_importable


def _on_sigterm(_signum, frame) -> None:
    """raise_terminated, except in the middle of an import: a native module that runs Python code while it loads
    (Triton's, through nanobind) aborts the whole process on an exception raised there (seen: SIGABRT, the
    temporary folder left behind). Then the signal comes again 0.1 s later, until the import is over."""
    from mirrorfast.errors import raise_terminated

    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            retry = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM))
            retry.daemon = True
            retry.start()
            return
        frame = frame.f_back
    raise_terminated()


def run_main(main, prog: str) -> int:
    ensure_importable()
    from mirrorfast.errors import MirrorfastError, Terminated, first_line, stop_if_terminated

    signal.signal(signal.SIGTERM, _on_sigterm)
    # Raised inside a __del__ or weakref callback (the import system's, under load), Terminated is printed with a
    # traceback and dropped: stop_if_terminated (the trainer's steps, gpu_suite's rows, the end) acts on it instead.
    default_hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: (
        None if isinstance(unraisable.exc_value, Terminated) else default_hook(unraisable))
    try:
        code = main()
        stop_if_terminated()  # a SIGTERM whose exception Python swallowed (in a __del__) still ends as one
        return code
    except MirrorfastError as exc:
        print(f"{prog}: error: {first_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (Ctrl-C), cleaned up", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{prog}: terminated (SIGTERM), cleaned up", file=sys.stderr)
        return 128 + signal.SIGTERM


def module_only(name: str, what: str) -> int:
    """What a module of the scripts (imported, never run) says when run, --help included: one line, exit 0 for
    --help, 2 otherwise (before, they ran nothing and exited 0)."""
    asked = bool({"-h", "--help"} & set(sys.argv[1:]))
    print(f"{name}: a module, not a script: {what}", file=sys.stdout if asked else sys.stderr)
    return 0 if asked else 2
