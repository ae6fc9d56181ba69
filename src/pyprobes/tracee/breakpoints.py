"""Software breakpoints: int3 bytes in the tracee's text and the original bytes they hide."""
from __future__ import annotations

from .memory import Memory

INT3 = b"\xcc"


class Breakpoints:
    """Where int3 is written, and what was there.

    A single-byte write at an instruction boundary is atomic with respect to instruction
    fetch, so inserting or removing one needs no freeze (invariant 6 of docs/ARCHITECTURE.md
    concerns multi-byte patches). A thread may already have trapped on a breakpoint when it is removed;
    `retired` remembers such addresses so its trap is recognised and rewound, not delivered.
    """

    def __init__(self, memory: Memory) -> None:
        self.memory = memory
        self.original: dict[int, bytes] = {}
        self.retired: set[int] = set()

    def __contains__(self, address: int) -> bool:
        return address in self.original

    def own(self, address: int) -> None:
        """An int3 that pyprobes wrote into a page of its own (a return trampoline): it hides nothing."""
        self.original[address] = b""
        self.retired.discard(address)

    def insert(self, address: int) -> None:
        if address in self.original:
            return
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

    def remove_all(self) -> None:
        for address in list(self.original):
            self.remove(address)

    def scrub(self, memory: Memory) -> None:
        """Write the original bytes into another address space (a forked child's copy of ours)."""
        for address, byte in self.original.items():
            if byte:
                memory.write(address, byte)

    def restore_view(self, address: int, data: bytes) -> bytes:
        """DATA read at ADDRESS with our int3 bytes replaced by the original ones."""
        if not self.original:
            return data
        out = bytearray(data)
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
