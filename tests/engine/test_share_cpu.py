"""Process.share_cpu(): tracer and tracee on one CPU while traced, every affinity given back at detach."""
import os
import subprocess
import time

import pyprobes


def _affinity(pid: int) -> dict[int, set[int]]:
    return {int(t): os.sched_getaffinity(int(t)) for t in os.listdir(f"/proc/{pid}/task")}


def test_share_cpu_pins_while_traced_and_restores_at_detach(build):
    exe = build("eng_affinity.c", "-pthread")
    tracer_before = os.sched_getaffinity(0)
    child = subprocess.Popen([str(exe), "2000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        original = _affinity(child.pid)
        proc = pyprobes.attach(child.pid)
        with proc:
            cpu = proc.share_cpu()
            assert os.sched_getaffinity(0) == {cpu}
            assert all(a == {cpu} for a in _affinity(child.pid).values())
            p = proc.probe("hit")
            child.stdin.write("go\n")
            child.stdin.flush()
            deadline = time.monotonic() + 60
            while p.hits < 4000 and time.monotonic() < deadline:
                proc.run(timeout=0.2)
            assert p.hits == 4000
        # detached: the tracer and every thread of the process have their own affinity back
        assert os.sched_getaffinity(0) == tracer_before
        assert all(_affinity(child.pid)[tid] == a for tid, a in original.items())
        child.stdin.close()
        out = child.stdout.read()
        assert child.wait(timeout=30) == 0
        assert out.split() == ["calls", "4000", "bye"]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.sched_setaffinity(0, tracer_before)
