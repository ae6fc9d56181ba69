"""Process.share_cpu(): tracer and tracee on one CPU while traced, every affinity given back at detach."""
import os
import time


def _affinity(pid: int) -> dict[int, set[int]]:
    return {int(t): os.sched_getaffinity(int(t)) for t in os.listdir(f"/proc/{pid}/task")}


def test_share_cpu_pins_while_traced_and_restores_at_detach(procs, fixture):
    exe = fixture("eng_affinity")
    tracer_before = os.sched_getaffinity(0)
    child = procs.start(exe, 2000)
    try:
        original = _affinity(child.pid)
        proc = procs.attach(child)
        with proc:
            cpu = proc.share_cpu()
            assert os.sched_getaffinity(0) == {cpu}
            assert all(a == {cpu} for a in _affinity(child.pid).values())
            p = proc.probe("hit")
            child.write("go\n")
            deadline = time.monotonic() + 60
            while p.hits < 4000 and time.monotonic() < deadline:
                proc.run(timeout=0.2)
            assert p.hits == 4000
        # detached: the tracer and every thread of the process have their own affinity back
        assert os.sched_getaffinity(0) == tracer_before
        assert all(_affinity(child.pid)[tid] == a for tid, a in original.items())
        child.close_stdin()
        assert child.wait_exit(30) == 0
        out = child.output.read_to_eof()
        assert out.split() == ["calls", "4000", "bye"]
    finally:
        os.sched_setaffinity(0, tracer_before)
