"""A stop signal for pyprobes reaches the command it started exactly once: passed on when it was
sent to pyprobes alone (`kill -INT`, SIGTERM), not again when a terminal's Ctrl-C already
reached the whole process group."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "pyprobes"]


@pytest.mark.parametrize("to_group", [False, True], ids=["kill-pyprobes-alone", "ctrl-c-to-the-group"])
def test_sigint_reaches_the_command_once(build, to_group):
    exe = build("cli_sigint.c")
    pp = subprocess.Popen([*CLI, "count", "cli_tick", "--", str(exe)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert pp.stdout.readline() == "ready\n"
        if to_group:
            os.killpg(pp.pid, signal.SIGINT)
        else:
            pp.send_signal(signal.SIGINT)
        out, err = pp.communicate(timeout=30)
        assert out == "sigint 1\n", err
        assert pp.returncode == 0, err
        assert "cli_tick" in err  # the table is printed
    finally:
        if pp.poll() is None:
            os.killpg(pp.pid, signal.SIGKILL)
            pp.wait()
