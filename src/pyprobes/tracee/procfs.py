"""What /proc says of a process and its threads: its tracer, whether a thread is dead, its pending
signals, the signals it handles itself, seccomp."""
from __future__ import annotations

import os


def tracer_of(pid: int, tid: int | None = None) -> tuple[int, str]:
    """The pid and command name of the process tracing PID (or its thread TID); (0, "") if none."""
    status = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    try:
        with open(status) as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    tracer = int(line.split()[1])
                    break
            else:
                return 0, ""
    except OSError:
        return 0, ""
    if not tracer:
        return 0, ""
    try:
        with open(f"/proc/{tracer}/comm") as f:
            return tracer, f.read().strip()
    except OSError:
        return tracer, "?"


def is_zombie(pid: int, tid: int) -> bool:
    """Thread TID has exited (a zombie, or gone from /proc altogether)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def has_exited(pid: int) -> bool:
    """Every thread of PID has exited: a zombie process its parent has not reaped yet (or gone)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return True
    return all(is_zombie(pid, tid) for tid in tids)


def parent_of(pid: int) -> int:
    """PID's parent process (PPid in /proc/PID/status); 0 if unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("PPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def pending_unblocked(pid: int, tid: int) -> int:
    """The mask of signals pending for thread TID alone (SigPnd) that it does not block."""
    pending = blocked = 0
    try:
        with open(f"/proc/{pid}/task/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"SigPnd:"):
                    pending = int(line[7:], 16)
                elif line.startswith(b"SigBlk:"):
                    blocked = int(line[7:], 16)
                    break
    except OSError:
        return 0
    return pending & ~blocked


def pending_signals(pid: int) -> int:
    """The mask of signals pending for process PID (ShdPnd) or any of its threads (SigPnd)."""
    mask = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for i, tid in enumerate(tids):
        try:
            with open(f"/proc/{pid}/task/{tid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"SigPnd:") or (i == 0 and line.startswith(b"ShdPnd:")):
                        mask |= int(line[7:], 16)
        except OSError:
            continue
    return mask


def status_fields(pid: int, *names: str) -> dict[str, str]:
    """The fields NAMES of /proc/PID/status ("SigCgt", "Seccomp"...), as text; missing ones are left out."""
    wanted = {name + ":" for name in names}
    found: dict[str, str] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition("\t")
                if key in wanted:
                    found[key[:-1]] = value.strip()
    except OSError:
        pass
    return found


def thread_name(pid: int, tid: int) -> str:
    """Thread TID's name (its comm), "" once it is gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            return f.read().rstrip("\n")
    except OSError:
        return ""


def has_memory(pid: int) -> bool:
    """Whether process PID still has its memory: an exiting process releases it before it is a
    zombie, and its /proc/PID/maps then reads empty."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            return bool(f.read(1))
    except OSError:
        return False
