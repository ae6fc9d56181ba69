"""Breakpoints' multi-byte patches (a jump-optimised probe's jmp, issue 11): kept with the
bytes they hide like int3s, in restore_view, scrub, remove_all and forget. The patch logic only
reads and writes memory, so a bytearray stands in for the tracee's."""
from __future__ import annotations

import pytest

from pyprobes.tracee.breakpoints import INT3, Breakpoints

BASE = 0x1000


class ByteMemory:
    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)

    def read(self, address: int, size: int) -> bytes:
        return bytes(self.data[address - BASE:address - BASE + size])

    def write(self, address: int, data: bytes) -> None:
        self.data[address - BASE:address - BASE + len(data)] = data


ORIGINAL = bytes(range(0x40, 0x80))


def test_patch_restore_view_scrub_unpatch():
    memory = ByteMemory(ORIGINAL)
    bps = Breakpoints(memory)
    bps.insert(BASE + 2)
    bps.patch(BASE + 8, b"\xe9\x01\x02\x03\x04\xcc\xcc")
    bps.patch(BASE + 20, b"\xe9\x05\x06\x07\x08")
    assert memory.read(BASE + 8, 7) == b"\xe9\x01\x02\x03\x04\xcc\xcc"
    assert memory.read(BASE + 2, 1) == INT3
    assert bps.restore_view(BASE, memory.read(BASE, len(ORIGINAL))) == ORIGINAL
    assert bps.restore_view(BASE + 10, memory.read(BASE + 10, 3)) == ORIGINAL[10:13]  # mid-patch
    assert bps.restore_view(BASE + 22, memory.read(BASE + 22, 20)) == ORIGINAL[22:42]
    child = ByteMemory(memory.data)
    bps.scrub(child)
    assert bytes(child.data) == ORIGINAL
    with pytest.raises(ValueError):
        bps.insert(BASE + 9)  # under a patch
    with pytest.raises(ValueError):
        bps.patch(BASE, b"\xe9\0\0\0\0")  # over the int3
    with pytest.raises(ValueError):
        bps.patch(BASE + 12, b"\xe9\0\0\0\0")  # over the first patch
    bps.unpatch(BASE + 8)
    assert memory.read(BASE + 8, 7) == ORIGINAL[8:15]
    bps.insert(BASE + 9)  # free again
    bps.remove_all()
    assert bytes(memory.data) == ORIGINAL and not bps.patches


def test_abandon_and_forget():
    memory = ByteMemory(ORIGINAL)
    bps = Breakpoints(memory)
    bps.patch(BASE + 8, b"\xe9\x01\x02\x03\x04")
    assert bps.abandon_patch(BASE + 8) == ORIGINAL[8:13]
    assert memory.read(BASE + 8, 5) == b"\xe9\x01\x02\x03\x04"  # nothing written back
    bps.insert(BASE + 9)
    bps.patch(BASE + 20, b"\xe9\x01\x02\x03\x04")
    bps.forget()
    assert not bps.patches and not bps.original
    assert bps.restore_view(BASE + 20, b"\xe9\x01\x02\x03\x04") == b"\xe9\x01\x02\x03\x04"
    bps.patch(BASE + 20, b"\xe9\x01\x02\x03\x04")  # nothing of ours is left to overlap
