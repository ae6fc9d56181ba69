"""Each error of the tracee layer, provoked for real: a missing process, a second tracer,
an unprivileged tracer, a command that cannot be started."""
from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap

import pytest

from pyprobes.tracee import AlreadyTraced, NoSuchProcess, PermissionDenied, SpawnError, Tracee

NOBODY = 65534


def _unused_pid() -> int:
    """The pid of a process that existed and was reaped: nothing has it now."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not os.path.exists(f"/proc/{proc.pid}")
    return proc.pid


def _target(procs):
    """A root-owned process that waits (on its stdin) until we let it go."""
    return procs.start(shutil.which("cat"))


def _finish_target(proc) -> None:
    proc.write(b"still fine\n")
    proc.close_stdin()
    assert proc.wait_exit() == 0
    assert proc.output.read_to_eof() == "still fine\n"


def _seized(procs, fixture, pid: int):
    """tr_seizer holding PID (a thread) with PTRACE_SEIZE, once it says so."""
    seizer = procs.start(fixture("tr_seizer"), pid, stdin_pipe=False)
    assert seizer.wait_output(r"^seized\n").string == "seized\n"
    return seizer


def _end(seizer) -> None:
    os.kill(seizer.pid, signal.SIGKILL)
    seizer.wait_exit()


def test_no_such_process():
    pid = _unused_pid()
    with pytest.raises(NoSuchProcess) as e:
        Tracee.attach(pid)
    assert e.value.pid == pid
    assert f"no process with PID {pid}" in str(e.value)
    for bad in (0, -1):
        with pytest.raises(NoSuchProcess):
            Tracee.attach(bad)


def test_already_traced_by_another_program(procs, fixture):
    target = _target(procs)
    seizer = _seized(procs, fixture, target.pid)
    with pytest.raises(AlreadyTraced) as e:
        Tracee.attach(target.pid)
    assert e.value.pid == target.pid
    assert e.value.tracer_pid == seizer.pid
    assert f"already traced by PID {seizer.pid} (tr_seizer)" in str(e.value)
    _end(seizer)
    _finish_target(target)


def test_one_thread_traced_by_another_program_leaves_nothing_seized(procs, fixture):
    """Another tracer holds one worker thread: attach fails naming it, and releases the
    threads it had already seized."""
    proc = procs.start(fixture("tr_counters"), 3)
    stop = int(proc.wait_output(r"^ready .*$")[0].split()[3], 16)
    worker = max(int(t) for t in os.listdir(f"/proc/{proc.pid}/task"))
    seizer = _seized(procs, fixture, worker)
    with pytest.raises(AlreadyTraced) as e:
        Tracee.attach(proc.pid)
    assert e.value.tracer_pid == seizer.pid and "(tr_seizer)" in str(e.value)
    for tid in os.listdir(f"/proc/{proc.pid}/task"):
        with open(f"/proc/{proc.pid}/task/{tid}/status") as f:
            tracer = int(f.read().split("TracerPid:")[1].split()[0])
        assert tracer == (seizer.pid if int(tid) == worker else 0), tid
    _end(seizer)
    tracee = procs.attach_tracee(proc)
    tracee.freeze()
    tracee.memory.write(stop, (1).to_bytes(4, "little"))
    tracee.detach()
    assert proc.wait_exit() == 0
    assert "done threads 3 moved 3" in proc.output.read_to_eof()


def test_already_traced_by_another_pyprobes(procs):
    """We trace it; a second Python process using pyprobes is told who does."""
    target = _target(procs)
    tracee = procs.attach_tracee(target)
    code = textwrap.dedent("""
        import sys
        from pyprobes.tracee import AlreadyTraced, Tracee
        try:
            Tracee.attach(int(sys.argv[1]))
        except AlreadyTraced as e:
            print(e.tracer_pid, e)
        else:
            print("attached")
    """)
    result = subprocess.run([sys.executable, "-c", code, str(target.pid)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    tracer_pid, _, message = result.stdout.strip().partition(" ")
    assert int(tracer_pid) == os.getpid()
    assert f"already traced by PID {os.getpid()}" in message
    # And the same process attaching twice is told the same.
    with pytest.raises(AlreadyTraced):
        Tracee.attach(target.pid)
    tracee.detach()
    _finish_target(target)


def test_permission_denied_for_an_unprivileged_tracer(procs):
    target = _target(procs)
    code = textwrap.dedent(f"""
        import os, sys
        # Import first: the interpreter's own files need not be readable by nobody.
        from pyprobes.tracee import PermissionDenied, Tracee
        os.setgroups([])
        os.setgid({NOBODY})
        os.setuid({NOBODY})
        assert os.getuid() == os.geteuid() == {NOBODY}
        try:
            Tracee.attach(int(sys.argv[1]))
        except PermissionDenied as e:
            print("PermissionDenied", e)
        except Exception as e:
            print(type(e).__name__, e)
        else:
            print("attached")
    """)
    result = subprocess.run([sys.executable, "-c", code, str(target.pid)], capture_output=True,
                            text=True, timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    out = result.stdout.strip()
    assert out.startswith("PermissionDenied "), out
    assert f"not permitted to trace PID {target.pid}" in out
    assert "ptrace_scope" in out and "CAP_SYS_PTRACE" in out
    _finish_target(target)


def test_spawn_errors(tmp_path):
    with pytest.raises(SpawnError, match="command not found: pyprobes-no-such-command"):
        Tracee.spawn(["pyprobes-no-such-command", "x"])
    with pytest.raises(SpawnError, match="no such file"):
        Tracee.spawn([str(tmp_path / "missing")])
    plain = tmp_path / "plain"
    plain.write_text("not a program\n")
    plain.chmod(0o644)
    with pytest.raises(SpawnError, match="not executable"):
        Tracee.spawn([str(plain)])
    # Executable, but not a format the kernel runs: execve fails in the child.
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00\x01\x02 not an ELF file\n")
    junk.chmod(0o755 | stat.S_IXUSR)
    with pytest.raises(SpawnError, match="could not execute"):
        Tracee.spawn([str(junk)])
    with pytest.raises(SpawnError, match="no command"):
        Tracee.spawn([])
    # Nothing was left behind: no child of ours remains.
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)
