"""A SlotHost double: fake page allocator plus a fake set of tracee threads."""
from __future__ import annotations

from typing import Callable

from pyprobes.slots import PAGE_SIZE, REACH, SLOT_SIZE, SlotMapError

BASE = 0x7F00_0000_0000
GIB = 1 << 30
# Where a migrated thread lands: "original code", never inside a slot page.
ORIGINAL_CODE = 0x5555_5555_0000
# Pages go a little above `near`, as an mmap hint that is honoured would.
MAP_OFFSET = 16 << 20


class FakeHost:
    def __init__(self) -> None:
        self.mapped: set[int] = set()
        self.map_calls = 0
        self.unmap_calls = 0
        self.threads: dict[int, int] = {}  # tid -> rip
        self.frozen = False
        self.freezes = 0
        self.thaws = 0
        self.migrated_total = 0
        self.migrated_log: list[tuple[int, int]] = []  # (tid, rip it was stepped out of)
        # Failure injection.
        self.fail_map = False
        self.fail_freeze_after: int | None = None  # raise after this many threads examined
        self.fail_unmap: set[int] = set()
        self.map_override: Callable[[int], int] | None = None

    # ---------------------------------------------------------------- SlotHost

    def map_page(self, near: int) -> int:
        self.map_calls += 1
        if self.fail_map:
            raise SlotMapError(f"no room near {near:#x}")
        if self.map_override is not None:
            address = self.map_override(near)
        else:
            address = (near & ~(PAGE_SIZE - 1)) + MAP_OFFSET
            while address in self.mapped:
                address += PAGE_SIZE
            assert abs(address - near) <= REACH
        assert address not in self.mapped
        self.mapped.add(address)
        return address

    def unmap_page(self, address: int) -> None:
        self.unmap_calls += 1
        assert address in self.mapped, f"unmapping {address:#x}, which is not mapped"
        if address in self.fail_unmap:
            raise OSError(f"munmap({address:#x}) failed")
        for tid, rip in self.threads.items():
            # A thread left in an unmapped page would fault: the cache must
            # never let that happen.
            assert not address <= rip < address + PAGE_SIZE, f"thread {tid} is in {address:#x}"
        self.mapped.discard(address)

    def freeze_and_migrate(self, inside: Callable[[int], bool]) -> int:
        assert not self.frozen, "nested freeze"
        self.frozen = True
        self.freezes += 1
        migrated = 0
        for n, (tid, rip) in enumerate(list(self.threads.items())):
            if self.fail_freeze_after is not None and n >= self.fail_freeze_after:
                raise OSError("PTRACE_INTERRUPT failed")
            if inside(rip):
                # A real host steps the copied instruction then the jmp back.
                self.threads[tid] = ORIGINAL_CODE + tid
                self.migrated_log.append((tid, rip))
                migrated += 1
        self.migrated_total += migrated
        return migrated

    def thaw(self) -> None:
        assert self.frozen, "thaw without freeze"
        self.frozen = False
        self.thaws += 1

    # ----------------------------------------------------------------- helpers

    def threads_in(self, address: int, size: int = SLOT_SIZE) -> list[int]:
        return [t for t, rip in self.threads.items() if address <= rip < address + size]
