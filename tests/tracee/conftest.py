"""Helpers for the tracee-control tests: an event pump over the tracee layer's own events and
/proc views of threads. The fixture processes, their output, the hang guard and cleanup are every
suite's: `procs` (tests/processes.py, tests/conftest.py)."""
from __future__ import annotations

import os
import time

from processes import Output
from pyprobes.tracee import Tracee
from pyprobes.tracee.errors import ProcessExited


def pump(tracee: Tracee, until, seconds: float = 10.0, output: Output | None = None, on_event=None):
    """Handle the tracee's events the default way until UNTIL() is true; fail after SECONDS.

    ON_EVENT(event), if given, sees every event first and returns True when it handled it.
    Returns UNTIL()'s true value.
    """
    deadline = time.monotonic() + seconds
    while True:
        while True:
            event = tracee.wait(block=False)
            if event is None:
                break
            if on_event is None or not on_event(event):
                tracee.handle_default(event)
        if output is not None:
            output.poll()
        value = until()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met after {seconds} s"
                                 + (f"; output so far: {output.text!r}" if output else ""))
        if output is not None:
            output.poll(0.001)
        else:
            time.sleep(0.001)


def drain(tracee: Tracee, on_event=None) -> list:
    """Handle every event already waiting, the default way; return them."""
    seen = []
    while True:
        event = tracee.wait(block=False)
        if event is None:
            return seen
        seen.append(event)
        if on_event is None or not on_event(event):
            tracee.handle_default(event)


def proc_tids(pid: int) -> set[int]:
    return {int(t) for t in os.listdir(f"/proc/{pid}/task")}


def proc_state(pid: int, tid: int) -> str:
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def expect_exit(tracee: Tracee) -> int | None:
    """run_to_exit() (the `procs` watchdog ends a hang); the exit code."""
    return tracee.run_to_exit()


def wait_exit_via_events(tracee: Tracee) -> ProcessExited:
    """Handle events until ProcessExited is raised; return it."""
    while True:
        try:
            event = tracee.wait()
        except ProcessExited as e:
            return e
        tracee.handle_default(event)
