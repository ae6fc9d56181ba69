"""pyprobes used as a library: the event loop must not take the exit status of a child that
another thread of the same program started (its Popen.wait() would then report 0)."""
from __future__ import annotations

import subprocess
import threading
import time


def test_a_child_of_another_thread_keeps_its_exit_status(procs, fixture):
    run = procs.spawn(fixture("eng_paced"), 1, 400, 1000)  # about half a second of sparse hits
    p = run.proc.probe("paced_hit")
    result: dict[str, object] = {}

    def other_thread() -> None:
        child = subprocess.Popen(["sh", "-c", "exit 7"])
        time.sleep(0.3)  # it exits at once, while the tracer waits for its tracee's stops
        result["code"] = child.wait(timeout=30)

    t = threading.Thread(target=other_thread)
    t.start()
    try:
        assert run.finish() == 0
    finally:
        t.join(timeout=60)
    assert result == {"code": 7}
    assert p.hits == 400
