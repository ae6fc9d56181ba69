"""Detach from a process that is being killed while pyprobes holds it (a Ctrl-C's default
action, a SIGKILL): its memory goes with its last thread, so nothing can be written back, and
nothing needs to be: detach ends quietly instead of failing on a short write."""
from __future__ import annotations

import os
import signal
import time

from pyprobes.tracee.procfs import has_memory


def test_detach_after_the_process_lost_its_memory(procs, fixture, capfd):
    run = procs.spawn(fixture("cli_target"), 100000, "100")
    proc = run.proc
    proc.run_to_entry()
    probe = proc.probe("cli_add")
    proc.run(timeout=0.2)
    assert probe.hits > 0
    os.kill(proc.pid, signal.SIGKILL)  # while it runs: each thread stops once more, at its exit
    proc.pause()  # collects those exit stops, and lets the threads go on dying
    deadline = time.monotonic() + 20
    while has_memory(proc.pid):  # its threads leave their stops and exit: the memory goes
        assert time.monotonic() < deadline, "the killed process kept its memory"
        time.sleep(0.01)
    proc.detach()
    assert "while detaching" not in capfd.readouterr().err
