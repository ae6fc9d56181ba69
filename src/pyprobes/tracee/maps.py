"""/proc/PID/maps: the one parser of a process's memory map (symbols/ builds modules on it).

It needs no ptrace, so every layer may read the map: the control layer for executable
regions, the engine for free gaps to put slot pages in, symbols/ for loaded ELF files.
"""
from __future__ import annotations

import sys
from typing import NamedTuple

__all__ = ["DELETED_SUFFIX", "Mapping", "executable_regions", "parse_maps", "read_maps"]

DELETED_SUFFIX = " (deleted)"


class Mapping(NamedTuple):
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str  # "r-xp"
    offset: int
    dev: str  # "fd:01"
    inode: int
    path: str  # "" for anonymous memory; may end in " (deleted)"; "[heap]", "[stack]"...

    @property
    def deleted(self) -> bool:
        return self.path.endswith(DELETED_SUFFIX) and self.inode != 0

    @property
    def executable(self) -> bool:
        return self.perms[2:3] == "x"


def parse_maps(text: str) -> list[Mapping]:
    """Parse the text of a /proc/PID/maps file."""
    out = []
    for line in text.splitlines():
        # The path is everything after the fifth field, spaces included.
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        start, _, end = parts[0].partition("-")
        path = parts[5].lstrip(" ") if len(parts) == 6 else ""
        try:
            numbers = int(start, 16), int(end, 16), int(parts[2], 16), int(parts[4])
        except ValueError:
            continue  # a line this parser does not understand describes no mapping it can use
        out.append(Mapping(numbers[0], numbers[1], parts[1], numbers[2], parts[3], numbers[3], path))
    return out


def read_maps(pid: int) -> list[Mapping]:
    """The mappings of process PID; ProcessLookupError if it is gone."""
    try:
        # A mapped file's name is bytes, not necessarily UTF-8: keep them, as os.fsdecode does.
        with open(f"/proc/{pid}/maps", encoding=sys.getfilesystemencoding(), errors="surrogateescape") as f:
            return parse_maps(f.read())
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {pid}") from None


def executable_regions(pid: int) -> list[tuple[int, int]]:
    """(start, end) of each executable mapping, file-backed ones first."""
    files, others = [], []
    for m in read_maps(pid):
        if m.executable:
            (files if m.path.startswith("/") else others).append((m.start, m.end))
    return files + others
