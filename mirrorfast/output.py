"""Atomic output directories: write into a temporary sibling, rename into place only when complete.

A failed or interrupted job leaves the destination exactly as it was (absent, or the previous output).
"""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from mirrorfast.errors import MirrorfastError, stop_if_terminated


def check_destination(out_dir: Path, is_ours: Callable[[Path], bool], overwrite: bool, what: str,
                      inputs: Iterable[str | os.PathLike | None] = (),
                      recorded: Callable[[Path], Iterable[str] | None] | None = None) -> None:
    """Refuse a destination that exists and is not a previous output of ours, or is one but holds top-level
    entries that output did not write (a user's notes, an export saved inside it; `recorded(out_dir)`: the
    names it listed; anything but a list of names, e.g. None, checks nothing), unless `overwrite`; one that
    cannot be replaced as a whole (the current directory, one of its parents, a mount point); and one that
    is or holds one of the job's `inputs` (paths; None and names of no file are skipped): replacing it would
    delete the input, with or without `overwrite`. A symlink to a directory stands for its target (`followed`;
    a dangling one is refused)."""
    if out_dir.is_symlink() and not out_dir.exists():
        raise MirrorfastError(f"{out_dir} is a symlink to {os.readlink(out_dir)}, which does not exist: create that "
                              "directory, or remove the link")
    out_dir = followed(out_dir)
    resolved, cwd = out_dir.resolve(), Path.cwd().resolve()
    for source in inputs:
        if source is not None and (source := Path(source)).exists():
            if resolved == (found := source.resolve()) or resolved in found.parents:
                holds = "is" if resolved == found else "holds"
                raise MirrorfastError(f"{out_dir} {holds} {source}, an input of this run: writing the output there "
                                      "would delete it; choose another directory")
    if resolved == cwd or resolved in cwd.parents:
        where = "the current directory" if resolved == cwd else "a parent of the current directory"
        raise MirrorfastError(f"{str(out_dir) or '.'} is {where}, which an output cannot replace; name a new "
                              f"directory (for example {out_dir / 'mirrorfast-out'})")
    if os.path.ismount(resolved):
        raise MirrorfastError(f"{out_dir} is a mount point, which an output cannot replace; name a directory in it")
    if out_dir.exists() and not out_dir.is_dir():
        raise MirrorfastError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        if not is_ours(out_dir):
            raise MirrorfastError(
                f"{out_dir} exists and is not a previous {what}; choose another directory or pass --overwrite"
            )
        listed = recorded(out_dir) if recorded is not None else None
        if not (isinstance(listed, list) and all(isinstance(name, str) for name in listed)):
            listed = None  # an output written before outputs listed their files, or a damaged record
        extra = sorted(set(os.listdir(out_dir)) - set(listed)) if listed is not None else []
        if extra:
            more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
            raise MirrorfastError(
                f"{out_dir} holds {extra[0]}{more}, which the previous output there did not write: replacing the "
                "directory would delete it; move it out, choose another directory, or pass --overwrite"
            )
    probe_writable(out_dir)


def recorded_files(record: Path):
    """The "files" a previous output listed in its JSON record (mirrorfast.json, export.json), for
    check_destination's `recorded` (which checks it is a list of names); None where the record is missing
    or damaged."""
    try:
        saved = json.loads(Path(record).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return saved.get("files") if isinstance(saved, dict) else None


def followed(path: Path) -> Path:
    """The directory an output named `path` goes to: the target of a symlink to a directory (a link to a
    bigger disk is replaced in its target, and stays a link), else `path` itself (check_destination refuses a
    dangling link: nothing is created where it points, as for `encode`'s files)."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() and path.is_dir() else path


def probe_writable(path: Path) -> None:
    """Fail now if `path` (a new file or folder) could not be saved later. Probe by creating a folder where
    the save will create its first one: os.access misses filesystems that refuse new entries whatever the
    permissions say (and root passes every permission check), and a long job should fail here, before it
    runs, not when it saves. Missing parents are probed at their nearest existing ancestor and created only
    when the output is saved (`parents_made`): a refused or failed job leaves no empty folders behind."""
    missing = _missing_parents(path)
    ancestor = missing[0].parent if missing else path.parent.resolve()  # the nearest existing one
    if not ancestor.is_dir():
        raise MirrorfastError(f"cannot create {path.parent.resolve()}: {ancestor} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.probe-", dir=ancestor))
    except OSError as exc:
        where = f"create {missing[0]}" if missing else f"write to {ancestor}"
        raise MirrorfastError(f"cannot {where}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def parents_made(path: Path) -> Iterator[None]:
    """Create `path`'s missing parent folders for the body, and remove those it created (if still empty)
    when the body fails or is interrupted. Another job may create the same ones meanwhile: shared."""
    created = []
    for folder in _missing_parents(path):
        try:
            folder.mkdir()
            created.append(folder)
        except FileExistsError:
            pass
        except OSError as exc:
            _remove_empty(created)
            raise MirrorfastError(f"cannot create {folder}: {exc.strerror or exc}") from None
    try:
        yield
    except BaseException:
        _remove_empty(created)
        raise


def _missing_parents(out_dir: Path) -> list[Path]:
    """The parent folders of `out_dir` that do not exist yet, outermost first."""
    missing, parent = [], out_dir.parent.resolve()  # the parent's: a symlink at out_dir itself is not followed
    while not parent.exists():
        missing.insert(0, parent)
        parent = parent.parent
    return missing


def _temporary_sibling(out_dir: Path, kind: str, where: Path | None = None) -> Path:
    parent = where or out_dir.parent.resolve()
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{kind}-", dir=parent))
    except OSError as exc:
        raise MirrorfastError(f"cannot write to {parent}: {exc.strerror or exc}") from None


# Outputs moved into place since `forget_completed_outputs()` (the CLI calls it per command): a job stopped by
# Ctrl-C / SIGTERM after its output was complete must not say that nothing was written.
_completed: list[Path] = []


def completed_outputs() -> list[Path]:
    return list(_completed)


def forget_completed_outputs() -> None:
    _completed.clear()


@contextlib.contextmanager
def atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `out_dir`; on success it replaces `out_dir` (and is listed
    in `completed_outputs()`, even if the previous output's removal is then interrupted)."""
    out_dir = followed(out_dir)
    with parents_made(out_dir):
        tmp = _temporary_sibling(out_dir, "tmp")
        old = None  # where the previous output is moved aside while the new one is moved in
        moving_in = False  # from here on, a missing tmp means it became out_dir
        try:
            yield tmp
            stop_if_terminated()  # a SIGTERM whose exception was swallowed on the way still moves nothing in
            readable_as_created(tmp)
            if out_dir.exists():
                old = _temporary_sibling(out_dir, "old")
                _rename(out_dir, old / "previous", f"cannot replace {out_dir}")
            moving_in = True
            _rename(tmp, out_dir, f"cannot move the finished output to {out_dir}")
            _completed.append(out_dir)
        except BaseException:  # an error, or Ctrl-C / SIGTERM at any point of the swap
            if out_dir in _completed:  # interrupted right after the append: rolled back all the same
                _completed.remove(out_dir)
            _roll_back(out_dir, tmp, old, moving_in)
            raise
    if old is not None:
        try:
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:  # interrupted while removing the previous output: the new one is complete
            shutil.rmtree(old, ignore_errors=True)
            raise


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Yield a binary file open on a fresh temporary sibling of `path`; when the body succeeds it replaces
    `path` (listed in `completed_outputs()`), else it is removed and `path` left as it was. Missing parent
    folders are created, and removed again on failure."""
    path = Path(path)
    with parents_made(path):
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except OSError as exc:
            raise MirrorfastError(f"cannot write to {path.parent}: {exc.strerror or exc}") from None
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle
            stop_if_terminated()  # a SIGTERM whose exception was swallowed on the way still writes nothing
            readable_as_created(Path(tmp))  # mkstemp makes it 0600
            os.replace(tmp, path)  # from here the new file is in place, whatever comes: listed as saved
            _completed.append(path)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise MirrorfastError(f"cannot write {path}: {exc.strerror or exc}") from None
            raise


def _rename(src: Path, dst: Path, failure: str) -> None:
    try:
        os.rename(src, dst)
    except OSError as exc:
        raise MirrorfastError(f"{failure}: {exc.strerror or exc}") from None


def _roll_back(out_dir: Path, tmp: Path, old: Path | None, moving_in: bool) -> None:
    """Leave the destination as it was before the save, wherever the swap stopped, and no temporaries.
    Only once the move-in began can a missing tmp mean it became out_dir (before, it may have been removed
    by something else, and out_dir is still the previous output)."""
    try:
        if moving_in and not tmp.exists() and out_dir.exists():  # the new output was moved in: take it out
            os.rename(out_dir, tmp)
        if old is not None and (old / "previous").exists() and not out_dir.exists():
            os.rename(old / "previous", out_dir)  # put the previous output back
    except OSError:
        pass  # the original error is the one to report
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the parent folders a failed save created (innermost first), if nothing else went into them."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells (os.umask can only set it, and
    setting it, even briefly, races with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def readable_as_created(path: Path) -> None:
    """Give `path` (and, for a directory, everything in it) the permissions a plain open()/mkdir() would
    have: mkdtemp/mkstemp make 0700/0600, and some writers (transformers' safetensors save) 0600, which
    another user or a serving container could not read."""
    mask = ~current_umask()
    for entry in [path] + (list(path.rglob("*")) if path.is_dir() else []):
        if entry.is_symlink():
            continue
        executable = entry.is_dir() or entry.stat().st_mode & 0o111
        os.chmod(entry, (0o777 if executable else 0o666) & mask)
