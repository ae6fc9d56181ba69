"""A killed tracer must not kill the traced program (engine/rescue.py, x86/rescue.py).

The tracer is a separate process (tests/fixtures/rescue_tracer.py) on the fixture's probed
function, boosted, stepped (lock, an indirect call) or emulated (nop5, jmp, call): after 2000
hits it stops collecting stops, so every thread ends up stopped at a trap of ours whose SIGTRAP
the kernel delivers when the tracer is SIGKILLed. The fixture's threads count their own calls
and the probed function counts them too: after the kill they run on, and both agree.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import pyprobes

from .conftest import maps, parse_output

TRACER = Path(__file__).parent.parent / "fixtures" / "rescue_tracer.py"
PR_SET_CHILD_SUBREAPER = 36
VARIANTS = ["rescue_boosted", "rescue_stepped", "rescue_icall", "rescue_nop", "rescue_jmp", "rescue_call"]
MODES = {"rescue_boosted": "boosted", "rescue_stepped": "stepped", "rescue_icall": "stepped",
         "rescue_nop": "emulated", "rescue_jmp": "emulated", "rescue_call": "emulated"}


class Tracer:
    """rescue_tracer.py run as a child; its stdout (and a spawned fixture's) read as it comes."""

    def __init__(self, procs, *args: str) -> None:
        from processes import Output

        r, w = os.pipe()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        self.popen = subprocess.Popen([sys.executable, str(TRACER), *args], stdout=w, env=env)
        os.close(w)
        self.output = Output(r)
        procs.outputs.append(self.output)
        procs.pids.append(self.popen.pid)

    def wait_for(self, pattern: str):
        import re
        import time

        deadline = time.monotonic() + 60
        while not re.search(pattern, self.output.text, re.M):
            assert self.popen.poll() is None, f"tracer ended: {self.output.text!r}"
            assert time.monotonic() < deadline, f"{pattern!r} not seen: {self.output.text!r}"
            self.output.poll(0.05)
        return re.search(pattern, self.output.text, re.M)

    def kill(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        assert self.popen.wait() == -signal.SIGKILL


def _traced_by(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("TracerPid:")).split()[1])


def _wait_untraced(pid: int) -> None:
    while _traced_by(pid):  # the kernel unlinks the dead tracer's tracees as it exits
        os.sched_yield()


@pytest.fixture
def subreaper():
    """Orphans (a spawned fixture whose tracer died) become our children, so we can reap them."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@pytest.mark.parametrize("function", VARIANTS)
def test_an_attached_program_survives_a_killed_tracer(procs, fixture, function):
    run = procs.start(fixture("eng_rescue"), function)
    run.wait_output(r"^ready")
    tracer = Tracer(procs, function, "2000", "hold", "attach", str(run.pid))
    line = tracer.wait_for(r"^tracer hits \d+ mode (\w+) rescue (\d).*\n")
    assert line[1] == MODES[function] and line[2] == "1", line[0]
    tracer.kill()
    _wait_untraced(run.pid)
    os.kill(run.pid, signal.SIGUSR1)
    assert run.wait_exit() == 0, run.text
    result = parse_output(run.text)[()]
    assert result["calls"] == result["loops"] > 2000, run.text


@pytest.mark.parametrize("function", ["rescue_boosted", "rescue_stepped", "rescue_nop"])
def test_a_spawned_program_survives_a_killed_tracer(procs, fixture, subreaper, function):
    tracer = Tracer(procs, function, "2000", "hold", "spawn", str(fixture("eng_rescue")), function)
    pid = int(tracer.wait_for(r"^ready (\d+)")[1])
    procs.pids.append(pid)
    line = tracer.wait_for(r"^tracer hits \d+ mode (\w+) rescue (\d).*\n")
    assert line[1] == MODES[function] and line[2] == "1", line[0]
    tracer.kill()
    _wait_untraced(pid)
    os.kill(pid, signal.SIGUSR1)
    _, status = os.waitpid(pid, 0)  # ours now (subreaper); PTRACE_O_EXITKILL would have killed it
    tracer.output.read_to_eof()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (status, tracer.output.text)
    result = parse_output(tracer.output.text)[()]
    assert "calls" in result and result["calls"] == result["loops"] > 2000, tracer.output.text


def test_a_program_with_its_own_sigtrap_handler_keeps_it(procs, fixture):
    """No rescue then: the program's handler is left alone, and after the tracer's death it is the
    one that gets the trap (this fixture's reports it and exits 42)."""
    run = procs.start(fixture("eng_rescue"), "rescue_boosted", "own")
    run.wait_output(r"^ready")
    tracer = Tracer(procs, "rescue_boosted", "2000", "hold", "attach", str(run.pid))
    line = tracer.wait_for(r"^tracer hits \d+ mode \w+ rescue (\d) (.*)\n")
    assert line[1] == "0" and "SIGTRAP itself" in line[2], line[0]
    tracer.kill()
    assert run.wait_exit() == 42, run.text
    assert "own handler si_code 128" in run.text  # SI_KERNEL: an int3 of the dead tracer's


def test_detach_puts_back_the_disposition_and_leaves_no_mapping(procs, fixture):
    run = procs.start(fixture("eng_rescue"), "rescue_nop")
    run.wait_output(r"^ready")
    before = maps(run.pid)
    proc = procs.attach(run)
    probe = proc.probe("rescue_nop")
    proc.run(timeout=0.2)
    assert probe.hits > 0 and proc.engine.rescue.installed
    rescue = proc.engine.rescue
    assert any(start == rescue.code for start, _, _, _ in maps(run.pid))
    proc.detach()
    assert maps(run.pid) == before
    os.kill(run.pid, signal.SIGUSR1)
    assert run.wait_exit() == 0, run.text
    assert "sigtrap default" in run.text


def test_a_handler_the_program_installs_meanwhile_stays(procs, fixture):
    """The program replaces our handler while traced (as a runtime starting up might): detach
    keeps the program's, instead of putting back the default it had at attach."""
    run = procs.start(fixture("eng_rescue"), "rescue_nop")
    run.wait_output(r"^ready")
    proc = procs.attach(run)
    proc.probe("rescue_nop")
    proc.run(timeout=0.1)
    rescue = proc.engine.rescue
    assert rescue.installed
    from pyprobes.tracee import syscalls
    from pyprobes.x86.rescue import DATA_OLD_ACTION_OFFSET, SA_RESTORER, SIGTRAP, sigaction

    # Play the program: a handler of its own (never run here) set with an injected rt_sigaction.
    proc.pause()
    theirs = rescue.data + DATA_OLD_ACTION_OFFSET
    proc.tracee.memory.write(theirs, sigaction(0x1234, SA_RESTORER, 0x5678))
    rescue.host.inject(lambda tid: syscalls.rt_sigaction(proc.tracee, tid, SIGTRAP, theirs, 0))
    proc.detach()
    os.kill(run.pid, signal.SIGUSR1)
    assert run.wait_exit() == 0, run.text
    assert "sigtrap other" in run.text
