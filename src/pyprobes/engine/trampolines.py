"""The trampoline cache's host (engine/optimizer.py): trampoline pages, each with a counter page beside it.

A counter page holds the counters of its trampoline page's slots, the record probes' ids
PROBE_ID_OFFSET past them, and the routines' addresses in its last words (record.py's action
routine's the last, the in-process return probes' entry routine's the one before).
"""
from __future__ import annotations

import struct
from mmap import mmap
from typing import TYPE_CHECKING, Callable

from ..slots import PAGE_SIZE, Slot
from ..x86 import TRAMPOLINE_SLOT_SIZE
from ..x86.record import PROBE_ID_OFFSET

if TYPE_CHECKING:
    from .slothost import TraceeSlotHost

COUNTER_SIZE = 8
assert PAGE_SIZE // TRAMPOLINE_SLOT_SIZE * COUNTER_SIZE <= PROBE_ID_OFFSET < PAGE_SIZE - 2 * COUNTER_SIZE
_COUNTER = struct.Struct("<Q")


class TrampolineHost:
    """The trampoline cache's SlotHost: the engine's slot host, plus a rw- counter page mapped
    next to each trampoline page (within ±2 GiB, so `lock inc [rip+X]` reaches it) and
    unmapped with it. Trampoline slot i counts in counter i of its page's counter page.

    The counter page is shared memory the tracer maps too, so counts are read without a
    system call, and the last ones still after an exec or the process's exit."""

    def __init__(self, host: "TraceeSlotHost") -> None:
        self.host = host
        self.counters: dict[int, int] = {}  # trampoline page -> its counter page (tracee address)
        self.views: dict[int, mmap] = {}    # trampoline page -> the tracer's view of its counters

    def map_page(self, near: int) -> int:
        page = self.host.map_page(near)
        try:
            self.counters[page], self.views[page] = self.host.map_shared_page(page, "pyprobes-counters")
        except BaseException:
            self.host.unmap_page(page)
            raise
        return page

    def unmap_page(self, address: int) -> None:
        self.host.unmap_page(address)
        counters = self.counters.pop(address, None)
        if counters is not None:
            self.host.unmap_page(counters)
        self.views.pop(address).close()

    def forget(self) -> None:
        """The tracee's pages are gone (exec): close our views."""
        for view in self.views.values():
            view.close()
        self.views.clear()
        self.counters.clear()

    def freeze_and_migrate(self, inside: Callable[[int], bool]) -> int:
        return self.host.freeze_and_migrate(inside)

    def thaw(self) -> None:
        self.host.thaw()

    def counter(self, slot: Slot) -> int:
        return self.counters[slot.page] + slot.index * COUNTER_SIZE

    def read(self, slot: Slot) -> int:
        return _COUNTER.unpack_from(self.views[slot.page], slot.index * COUNTER_SIZE)[0]

    def reset(self, slot: Slot) -> None:
        _COUNTER.pack_into(self.views[slot.page], slot.index * COUNTER_SIZE, 0)
