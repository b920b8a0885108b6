"""Atomic output directories: write into a temporary sibling, rename into place only when complete.

A failed or interrupted job leaves the destination exactly as it was (absent, or the previous output).
"""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from mirrorfast.errors import MirrorfastError


def check_destination(out_dir: Path, is_ours: Callable[[Path], bool], overwrite: bool, what: str) -> None:
    """Refuse a destination that exists and is not a previous output of ours, unless `overwrite`."""
    if out_dir.exists() and not out_dir.is_dir():
        raise MirrorfastError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_ours(out_dir) and not overwrite:
        raise MirrorfastError(
            f"{out_dir} exists and is not a previous {what}; choose another directory or pass --overwrite"
        )
    parent = out_dir.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MirrorfastError(f"cannot create {parent}: {exc.strerror or exc}") from None
    # Probe by creating what atomic_directory will create: os.access misses filesystems that refuse new
    # entries whatever the permissions say (and root passes every permission check), and a long job
    # should fail here, before it runs, not when it saves.
    os.rmdir(_temporary_sibling(out_dir, "probe"))


def _temporary_sibling(out_dir: Path, kind: str) -> Path:
    parent = out_dir.resolve().parent
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{kind}-", dir=parent))
    except OSError as exc:
        raise MirrorfastError(f"cannot write to {parent}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `out_dir`; on success it replaces `out_dir`."""
    out_dir = Path(out_dir)
    tmp = _temporary_sibling(out_dir, "tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the result must be readable like any directory
    try:
        yield tmp
        old = None
        if out_dir.exists():
            old = _temporary_sibling(out_dir, "old")
            os.rename(out_dir, old / "previous")
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if old is not None:
                os.rename(old / "previous", out_dir)  # put the previous output back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
