"""Atomic output directories (mirrorfast.output): what a destination may be, what a finished output looks
like on disk, and what a failure leaves (nothing)."""

import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from mirrorfast.errors import MirrorfastError
from mirrorfast.output import (atomic_directory, check_destination, completed_outputs, current_umask,
                               forget_completed_outputs)

NOT_OURS = lambda path: False  # noqa: E731


@pytest.mark.parametrize("name", [".", "", "sub/.."])
def test_the_current_directory_is_refused_before_any_work(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MirrorfastError, match="is the current directory, which an output cannot replace"):
        check_destination(Path(name), NOT_OURS, overwrite=True, what="output")
    assert list(tmp_path.iterdir()) == []  # no probe left behind


def test_a_parent_of_the_current_directory_is_refused(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    with pytest.raises(MirrorfastError, match="is a parent of the current directory"):
        check_destination(Path(".."), NOT_OURS, overwrite=True, what="output")
    check_destination(Path("../c"), NOT_OURS, overwrite=False, what="output")  # a sibling is fine


def test_finished_output_is_readable_as_the_umask_allows(tmp_path):
    """mkdtemp makes 0700 and some writers (transformers' safetensors save) 0600: the finished directory
    and every file in it get what a plain mkdir/open would have given (an executable keeps its x bits)."""
    mask = current_umask()
    assert os.umask(mask) == mask  # read right, and reading it changed nothing
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "sub").mkdir(mode=0o700)
        for name, mode in [("weights.safetensors", 0o600), ("sub/config.json", 0o600), ("run.sh", 0o700)]:
            (tmp / name).write_text("x")
            os.chmod(tmp / name, mode)
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes == {".": 0o777 & ~mask, "sub": 0o777 & ~mask, "weights.safetensors": 0o666 & ~mask,
                     "sub/config.json": 0o666 & ~mask, "run.sh": 0o777 & ~mask}


def test_a_failed_job_leaves_the_previous_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("keep")
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        (tmp / "half.txt").write_text("half-written")
        raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["previous.txt"]


def test_a_destination_that_cannot_be_moved_aside_is_one_clear_error(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    real_rename = os.rename

    def busy(src, dst):
        if Path(src) == out:
            raise OSError(16, "Device or resource busy")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", busy)
    with pytest.raises(MirrorfastError, match="cannot replace .*out: Device or resource busy"), atomic_directory(out):
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or aside directory left


def test_missing_parents_are_created_only_when_the_output_is_saved(tmp_path):
    """A refused or failed job leaves no empty folders: the check probes the nearest existing ancestor,
    the save creates the parents, and a failed save removes the ones it created."""
    out = tmp_path / "a" / "b" / "out"
    check_destination(out, NOT_OURS, overwrite=False, what="output")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        assert tmp.parent == out.parent and out.parent.is_dir()
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "kept.txt").write_text("someone else's")  # a folder that existed is left as it was
    with pytest.raises(RuntimeError), atomic_directory(out):
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "kept.txt"]
    with atomic_directory(out) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert (out / "done.txt").read_text() == "ok"


def test_a_parent_that_is_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MirrorfastError, match=r"cannot create .*file/sub: .*file is not a directory"):
        check_destination(tmp_path / "file" / "sub" / "out", NOT_OURS, overwrite=False, what="output")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


@pytest.mark.parametrize("when", ["after-moving-aside", "after-moving-in"])
def test_an_interrupt_during_the_swap_leaves_the_previous_output(tmp_path, monkeypatch, when):
    """Ctrl-C or SIGTERM can land between the two renames of the swap, or just after the second: the
    destination ends as it was (the previous output, not the new one and not nothing), with no temporaries."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("keep")
    real_rename = os.rename
    renames = []
    interrupt_after = 1 if when == "after-moving-aside" else 2  # later renames are the roll-back's

    def rename_then_interrupt(src, dst):
        real_rename(src, dst)
        renames.append(Path(dst))
        if len(renames) == interrupt_after:
            raise KeyboardInterrupt  # a signal handled just after the rename returned

    monkeypatch.setattr(os, "rename", rename_then_interrupt)
    forget_completed_outputs()
    with pytest.raises(KeyboardInterrupt), atomic_directory(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["previous.txt"]
    assert completed_outputs() == []  # rolled back: not saved


def test_an_interrupt_while_removing_the_previous_output_keeps_the_new_one(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("old")
    real_rmtree = shutil.rmtree
    interrupted = []

    def rmtree_interrupted_once(path, *args, **kwargs):
        if ".out.old-" in str(path) and not interrupted:
            interrupted.append(path)
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree_interrupted_once)
    forget_completed_outputs()
    with pytest.raises(KeyboardInterrupt), atomic_directory(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert interrupted and [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert completed_outputs() == [out]  # what the CLI reports: saved, not "no output"


def test_the_cli_says_an_output_saved_before_the_interrupt_was_saved(tmp_path, monkeypatch, capsys):
    """A SIGTERM while the previous output is removed (or after the save, before the command returns) came
    too late to stop the job: the new output is in place, and the message said nothing was written."""
    from mirrorfast import cli
    from mirrorfast.errors import Terminated

    out = tmp_path / "out"

    def handler(args):
        with atomic_directory(out) as tmp:
            (tmp / "new.txt").write_text("new")
        raise Terminated

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_known_args",
                        lambda argv: (SimpleNamespace(command="export", handler=handler), []))
    assert cli.main([]) == 143
    assert f"terminated (SIGTERM); {out} was already saved complete; no partial output was left" in \
        capsys.readouterr().err

    def terminated_before_saving(args):
        raise Terminated

    # The next command's message is its own.
    monkeypatch.setattr(parser, "parse_known_args",
                        lambda argv: (SimpleNamespace(command="export", handler=terminated_before_saving), []))
    assert cli.main([]) == 143
    assert capsys.readouterr().err == "mirrorfast export: terminated (SIGTERM); no partial output was left\n"


def test_a_temporary_folder_removed_by_something_else_never_costs_the_previous_output(tmp_path):
    """If the job's temporary folder vanishes (a tmp cleaner, a stray rm) and the save then fails, the roll
    back must not take the previous output for the new one and remove it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.bin").write_text("previous")
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        shutil.rmtree(tmp)
        raise RuntimeError("the job failed")
    assert (out / "model.bin").read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_parent_another_job_creates_meanwhile_is_shared_not_an_error(tmp_path, monkeypatch):
    """Two saves into the same new parent (a sweep writing results/new/run-1 and run-2): the one that finds
    the parent made between its check and its mkdir uses it, and on failure leaves it (it is not its own)."""
    from mirrorfast import output

    parent = tmp_path / "results"
    real_missing = output._missing_parents

    def made_meanwhile(out_dir):
        missing = real_missing(out_dir)
        parent.mkdir(exist_ok=True)  # the other job wins the race
        return missing

    monkeypatch.setattr(output, "_missing_parents", made_meanwhile)
    with pytest.raises(RuntimeError), atomic_directory(parent / "run-2"):
        raise RuntimeError("this job failed")
    assert parent.is_dir()  # the other job's folder stays
    with atomic_directory(parent / "run-2") as tmp:
        (tmp / "done").write_text("ok")
    assert (parent / "run-2" / "done").is_file()


def test_a_sigterm_python_swallowed_still_moves_nothing_in(tmp_path, capsys):
    """Python runs a signal handler between bytecodes; one that runs inside a __del__ (or a weakref callback:
    the import system's module locks, seen under load in `mirrorfast export`) has its Terminated printed as
    "Exception ignored" and dropped, and the job goes on. The CLI's handler also leaves a flag, and the
    commit checks it: nothing is moved in, the job ends as terminated, and the dropped exception is not
    printed (no traceback)."""
    import signal

    from mirrorfast import cli
    from mirrorfast.errors import Terminated

    class SignalledWhileFinalized:
        def __del__(self):
            signal.raise_signal(signal.SIGTERM)  # the handler runs here, inside __del__
            sum(range(1000))  # a few more bytecodes, should the handler wait for the next check

    reached_the_end = False
    out = tmp_path / "out"
    with pytest.raises(Terminated):
        with cli._sigterm_unwinds("export"):
            with atomic_directory(out) as tmp:
                (tmp / "weights").write_text("complete, but the job was told to stop")
                SignalledWhileFinalized()  # collected at once: __del__ runs now
                reached_the_end = True
    assert reached_the_end, "the handler's exception was not swallowed: this test did not exercise that case"
    assert list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err
    assert "Exception ignored" not in err and "Traceback" not in err, err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_previous_output_holding_other_entries_is_refused_unless_overwrite(tmp_path):
    """A previous output is replaced without --overwrite only when it holds just what it recorded writing."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("model.bin", "notes.md", "zz-export"):
        (out / name).write_text(name)
    ours = lambda path: True  # noqa: E731
    check_destination(out, ours, False, "output", recorded=lambda path: None)  # an output that listed nothing
    check_destination(out, ours, False, "output", recorded=lambda path: ["model.bin", "notes.md", "zz-export"])
    with pytest.raises(MirrorfastError, match="holds notes.md and 1 more, which the previous output there did not"):
        check_destination(out, ours, False, "output", recorded=lambda path: ["model.bin"])
    check_destination(out, ours, True, "output", recorded=lambda path: ["model.bin"])


def test_a_symlinked_destination_is_written_in_its_target(tmp_path):
    """--output naming a link to a folder (say on a bigger disk): the output replaces the target, and the
    link stays a link (it was replaced by a plain folder before, and the target left as it was)."""
    target, link = tmp_path / "disk" / "target", tmp_path / "link"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("previous output")
    link.symlink_to(target, target_is_directory=True)
    ours = lambda path: (path / "old.txt").is_file()  # noqa: E731
    check_destination(link, ours, False, "output")
    with atomic_directory(link) as tmp:
        (tmp / "new.txt").write_text("new output")
    assert link.is_symlink() and (target / "new.txt").is_file() and not (target / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "link"]  # no temporaries left anywhere
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["target"]
    dangling = tmp_path / "dangling"  # refused: nothing is created where it points
    dangling.symlink_to(tmp_path / "disk" / "new-target")
    with pytest.raises(MirrorfastError, match="dangling is a symlink to .*new-target, which does not exist"):
        check_destination(dangling, ours, False, "output")
