"""How the benchmark scripts end: one line on stderr and an exit code, never a traceback, for bad input and signals.

`run_main(main, prog)` runs main() with SIGTERM raising mirrorfast's Terminated, as the `mirrorfast` commands do,
so that a stopped run (`timeout`, a scheduler, the device tool) unwinds through its `with` / `finally` blocks and
removes its temporary folders and server subprocesses, then exits 143; Ctrl-C the same with 130; a MirrorfastError
(bad input the package found, e.g. a folder that is not an export) is `PROG: error: ...` and exit 2.
"""

from __future__ import annotations

import signal
import sys

from from_checkout import ensure_importable


def run_main(main, prog: str) -> int:
    ensure_importable()
    from mirrorfast.errors import MirrorfastError, Terminated, first_line, sigterm_unwinds

    try:
        with sigterm_unwinds():  # as the `mirrorfast` commands run
            return main()
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
