"""The little of /proc/PID/maps the control layer needs (symbols/ has the full reading)."""
from __future__ import annotations


def executable_regions(pid: int) -> list[tuple[int, int]]:
    """(start, end) of each executable mapping, file-backed ones first."""
    files, others = [], []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if "x" not in fields[1]:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            path = fields[5].strip() if len(fields) > 5 else ""
            (files if path.startswith("/") else others).append((start, end))
    return files + others
