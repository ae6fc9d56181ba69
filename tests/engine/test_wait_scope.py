"""pyprobes used as a library: the event loop must not take the exit status of a child that
another thread of the same program started (its Popen.wait() would then report 0)."""
from __future__ import annotations

import subprocess
import threading
import time


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"  # reaped: by the tracer, if that is the bug


def test_a_child_of_another_thread_keeps_its_exit_status(procs, fixture):
    run = procs.spawn(fixture("eng_paced"), 1, 400, 1000)  # about half a second of sparse hits
    p = run.proc.probe("paced_hit")
    result: dict[str, object] = {}

    def other_thread() -> None:
        child = subprocess.Popen(["sh", "-c", "exit 7"])
        # It exits at once: once it is a zombie, let the tracer wait for a few more of its
        # tracee's stops (its waitpid would take the zombie's status if it waited too widely).
        deadline = time.monotonic() + 30
        while _state(child.pid) not in ("Z", "gone") and time.monotonic() < deadline:
            time.sleep(0.001)
        hits = p.hits
        while p.hits < min(hits + 20, 400) and run.proc.alive and time.monotonic() < deadline:
            time.sleep(0.001)
        result["code"] = child.wait(timeout=30)

    t = threading.Thread(target=other_thread)
    t.start()
    try:
        assert run.finish() == 0
    finally:
        t.join(timeout=60)
    assert result == {"code": 7}
    assert p.hits == 400
