"""Software breakpoints and jump patches: int3 bytes and multi-byte patches in the tracee's text,
and the original bytes they hide."""
from __future__ import annotations

from bisect import bisect_left, insort

from .memory import Memory

INT3 = b"\xcc"
_LONGEST_PATCH = 64  # no patch is longer: restore_view looks this far back for one


class Breakpoints:
    """Where int3 is written, and what was there.

    A single-byte write at an instruction boundary is atomic with respect to instruction
    fetch, so inserting or removing one needs no freeze (invariant 6 of docs/ARCHITECTURE.md
    concerns multi-byte patches). A thread may already have trapped on a breakpoint when it is removed;
    `retired` remembers such addresses so its trap is recognised and rewound, not delivered.

    A *patch* (a jump-optimised probe's ``jmp``) replaces several bytes: the caller writes it
    with every thread frozen (invariant 6). Its original bytes are kept like an int3's, so
    every read through restore_view, a fork child's scrub and detach see or put back the
    original text.
    """

    def __init__(self, memory: Memory) -> None:
        self.memory = memory
        self.original: dict[int, bytes] = {}
        self.retired: set[int] = set()
        self.patches: dict[int, bytes] = {}  # start address -> the original bytes a patch hides
        self._patch_starts: list[int] = []    # sorted: thousands of patches, looked up per read
        self._patched: set[int] = set()       # every byte under a patch

    def __contains__(self, address: int) -> bool:
        return address in self.original

    def own(self, address: int) -> None:
        """An int3 that pyprobes wrote into a page of its own (a return trampoline): it hides nothing."""
        self.original[address] = b""
        self.retired.discard(address)

    def insert(self, address: int) -> None:
        if address in self.original:
            return
        if address in self._patched:
            raise ValueError(f"{address:#x} is under a patch of ours: unpatch it first")
        byte = self.memory.read(address, 1)
        if byte == INT3:
            raise ValueError(f"{address:#x} already holds an int3 that is not pyprobes'")
        self.memory.write(address, INT3)
        self.original[address] = byte
        self.retired.discard(address)

    def remove(self, address: int) -> None:
        byte = self.original.pop(address)
        if byte:
            self.memory.write(address, byte)
        self.retired.add(address)

    def abandon(self, address: int) -> None:
        """Forget the breakpoint at ADDRESS without writing its byte back: the mapping it was
        in is gone (an unloaded library), and whatever is there now is not ours."""
        self.original.pop(address, None)

    def patch(self, address: int, data: bytes) -> None:
        """Write DATA at ADDRESS, keeping what it hides. No int3 of ours may lie under it."""
        covered = range(address, address + len(data))
        if any(a in self.original or a in self._patched for a in covered):
            raise ValueError(f"{address:#x}..{covered.stop:#x} overlaps a breakpoint or patch of ours")
        original = self.memory.read(address, len(data))
        self.memory.write(address, data)
        self.patches[address] = original
        insort(self._patch_starts, address)
        self._patched.update(covered)

    def unpatch(self, address: int) -> None:
        """Put back the bytes the patch at ADDRESS hides (every thread frozen: invariant 6)."""
        self.memory.write(address, self.abandon_patch(address))

    def abandon_patch(self, address: int) -> bytes:
        """Forget the patch at ADDRESS without writing (its mapping is gone); its original bytes."""
        original = self.patches.pop(address)
        del self._patch_starts[bisect_left(self._patch_starts, address)]
        self._patched.difference_update(range(address, address + len(original)))
        return original

    def remove_all(self) -> None:
        for address in list(self.original):
            self.remove(address)
        for address in list(self.patches):
            self.unpatch(address)

    def scrub(self, memory: Memory) -> None:
        """Write the original bytes into another address space (a forked child's copy of ours)."""
        for address, byte in self.original.items():
            if byte:
                memory.write(address, byte)
        for address, data in self.patches.items():
            memory.write(address, data)

    def restore_view(self, address: int, data: bytes) -> bytes:
        """DATA read at ADDRESS with our int3 bytes and patches replaced by the original ones."""
        if not self.original and not self.patches:
            return data
        out = bytearray(data)
        end = address + len(data)
        starts = self._patch_starts
        for i in range(bisect_left(starts, address - _LONGEST_PATCH), bisect_left(starts, end)):
            start = starts[i]
            hidden = self.patches[start]
            lo, hi = max(start, address), min(start + len(hidden), end)
            if lo < hi:
                out[lo - address:hi - address] = hidden[lo - start:hi - start]
        original = self.original
        # Only an int3 byte can be one of ours: look those up (scanning every breakpoint for
        # every read made placing thousands, 'libc:*', quadratic).
        at = data.find(INT3)
        while at >= 0:
            byte = original.get(address + at)
            if byte:
                out[at] = byte[0]
            at = data.find(INT3, at + 1)
        return bytes(out)

    def forget(self) -> None:
        """After exec: the new image holds none of our bytes."""
        self.original.clear()
        self.retired.clear()
        self.patches.clear()
        self._patch_starts.clear()
        self._patched.clear()
