"""The command's conventions, whatever the subcommand: one line per failure and exit 2 (argparse's usage
errors too), --debug adds the traceback without changing the exit code, and a Ctrl-C ends with 130 even when
pressed twice."""

import subprocess
import sys

import pytest

from mirrorfast.cli import main


@pytest.mark.parametrize("argv, message", [
    (["train", "--epochs", "1.5"], "mirrorfast train: error: argument --epochs: invalid int value: '1.5' "
                                   "(see mirrorfast train --help)"),
    (["encode", "somewhere"], "mirrorfast encode: error: the following arguments are required: --input, --output"),
    ([], "mirrorfast: error: the following arguments are required: COMMAND (see mirrorfast --help)"),
    (["trian"], "mirrorfast: error: argument COMMAND: invalid choice: 'trian'"),
    (["eval", "somewhere", "--bogus", "x"], "mirrorfast eval: error: unrecognized arguments: --bogus x "
                                            "(see mirrorfast eval --help)"),
])
def test_usage_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1 and err.startswith(message), err


@pytest.mark.parametrize("argv", [["--debug", "eval", "/no/such/model", "--sts", "{sts}"],
                                  ["eval", "/no/such/model", "--sts", "{sts}", "--debug"]])
def test_debug_shows_the_traceback_and_keeps_the_exit_code(argv, tmp_path, capsys):
    """--debug made a MirrorfastError escape main (exit 1 instead of 2), and was refused after the command."""
    sts = tmp_path / "sts.csv"
    sts.write_text("a,b,1\nc,d,2\ne,f,3\n")
    assert main([a.format(sts=sts) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.rstrip().splitlines()[-1] == "mirrorfast eval: error: model directory /no/such/model does not exist"
    assert main(["eval", "/no/such/model", "--sts", str(sts)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_second_ctrl_c_after_the_first_exits_at_once(tmp_path):
    """After the first Ctrl-C is handled, the interpreter joins worker threads on its way out; a second
    Ctrl-C there printed "Exception ignored in: <module 'threading'>" and a traceback."""
    script = tmp_path / "twice.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "import mirrorfast.envinfo\n"
        "def interrupted():\n"
        "    raise KeyboardInterrupt\n"
        "mirrorfast.envinfo.report = interrupted\n"
        "sys.argv = ['mirrorfast', 'env']\n"
        "from mirrorfast.cli import main\n"
        "assert main() == 130\n"
        "os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, while the process is on its way out\n"
        "time.sleep(30)\n"
        "print('still running')\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130 and "still running" not in done.stdout, done.stderr
    assert done.stderr.strip() == "mirrorfast env: interrupted; no partial output was left"


def test_sigterm_waits_for_an_import_to_finish(monkeypatch):
    """Terminated raised inside an import can abort the process (a native module that runs Python code while
    it loads, as Triton's does); the handler sends the signal again 0.1 s later instead, outside imports."""
    import signal
    import threading
    from types import SimpleNamespace

    from mirrorfast import errors

    def frame(filename, back=None):
        return SimpleNamespace(f_code=SimpleNamespace(co_filename=filename), f_back=back)

    sent = threading.Event()
    monkeypatch.setattr(errors.os, "kill", lambda pid, signum: sent.set() if signum == signal.SIGTERM else None)
    try:
        importing = frame("model.py", frame("<frozen importlib._bootstrap>"))
        errors._raise_terminated_outside_imports(signal.SIGTERM, importing)
        assert sent.wait(5)  # deferred, not raised
        with pytest.raises(errors.Terminated):
            errors._raise_terminated_outside_imports(signal.SIGTERM, frame("model.py", frame("cli.py")))
    finally:
        errors.reset_termination()
