"""A spawned program gets the signal dispositions and mask its shell would have given it, not
Python's (issue 14, item 4): CPython ignores SIGPIPE and SIGXFSZ at startup, and an ignored
disposition and the signal mask survive exec. So a program writing past RLIMIT_FSIZE dies of
SIGXFSZ under pyprobes as it does without it. (tests/fixtures/sig_inherit.c)"""
from __future__ import annotations

import re
import signal
import subprocess
import sys


SIGPIPE_BIT = 1 << (signal.SIGPIPE - 1)
SIGXFSZ_BIT = 1 << (signal.SIGXFSZ - 1)


def _masks(text: str) -> tuple[int, int]:
    ignored = int(re.search(r"^SigIgn:\s*([0-9a-f]+)$", text, re.M)[1], 16)
    blocked = int(re.search(r"^SigBlk:\s*([0-9a-f]+)$", text, re.M)[1], 16)
    return ignored, blocked


def test_spawned_with_default_dispositions_and_an_empty_mask(procs, fixture, tmp_path):
    # Python (this process) ignores both; and a blocked signal in the spawning thread must not
    # be inherited either.
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGXFSZ})
    try:
        run = procs.spawn(fixture("sig_inherit"), tmp_path / "big")
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    assert run.finish() == -signal.SIGXFSZ, run.text
    ignored, blocked = _masks(run.text)
    assert not ignored & (SIGPIPE_BIT | SIGXFSZ_BIT), hex(ignored)
    assert blocked == 0, hex(blocked)
    assert "survived" not in run.text


def test_the_command_line_reports_the_shells_status(fixture, tmp_path):
    """`pyprobes count main -- prog` exits with the program's status: 128 + SIGXFSZ."""
    r = subprocess.run([sys.executable, "-m", "pyprobes", "count", "main", "--", str(fixture("sig_inherit")),
                        str(tmp_path / "big")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 128 + signal.SIGXFSZ, r
    ignored, _ = _masks(r.stdout)
    assert not ignored & SIGXFSZ_BIT


def test_a_signal_the_user_ignored_stays_ignored(procs, fixture):
    """nohup's SIGHUP is the user's choice, not Python's: the program keeps it."""
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        run = procs.spawn(fixture("sig_inherit"))
    finally:
        signal.signal(signal.SIGHUP, old)
    assert run.finish() == 0
    ignored, _ = _masks(run.text)
    assert ignored & (1 << (signal.SIGHUP - 1))
