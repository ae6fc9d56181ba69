"""A stop signal ignored when pyprobes starts (SIGINT in a background job, SIGHUP under nohup)
stays ignored for the command pyprobes starts, as it would without pyprobes."""
from __future__ import annotations

import signal
import subprocess
import sys

CLI = [sys.executable, "-m", "pyprobes"]


def _ignored(status: str) -> int:
    return int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)


def test_ignored_stop_signals_stay_ignored_in_the_command():
    def ignore():
        for sig in (signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)

    r = subprocess.run([*CLI, "count", "libc:getpid", "--", "cat", "/proc/self/status"], capture_output=True,
                       text=True, timeout=60, preexec_fn=ignore)
    assert r.returncode == 0, r.stderr
    ignored = _ignored(r.stdout)
    for sig in (signal.SIGINT, signal.SIGHUP):
        assert ignored & (1 << (sig - 1)), (sig, hex(ignored))
    assert not ignored & (1 << (signal.SIGTERM - 1))  # not ignored by the parent: the default
