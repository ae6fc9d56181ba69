"""Instruction-slot cache: the user-space twin of the kernel's kprobe_insn_cache.

A slot is SLOT_SIZE bytes in an executable page mapped into the tracee, holding
a relocated copy of one probed instruction (and, when boosted, a ``jmp`` back).

The seed ("kprobes: enable booster on the preemptible kernel") splits frees in
two.  A *clean* slot was only ever single-stepped, so the tracer always knows
whether a thread is in it and can free it at once.  A *dirty* slot ran boosted:
a thread may be anywhere in it while the tracer is not looking, so it becomes
*garbage*, reclaimed only after a freeze has stepped every thread out of it.
Collections are batched so one freeze pays for many slots, and are triggered
exactly as the seed does: when garbage exceeds one page worth of slots, or when
``get()`` finds no free slot in reach.

The cache never touches the tracee itself; it goes through a :class:`SlotHost`.
It is not thread-safe: the engine drives it from its single ptrace event loop.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable, Protocol

from ..errors import PyprobesError
from ..x86 import SLOT_SIZE  # what a slot holds is x86's to say: one definition, there

__all__ = [
    "PAGE_SIZE",
    "REACH",
    "SLOT_SIZE",
    "SLOTS_PER_PAGE",
    "Slot",
    "SlotCache",
    "SlotHost",
    "SlotMapError",
    "in_reach",
]

PAGE_SIZE = 4096
SLOTS_PER_PAGE = PAGE_SIZE // SLOT_SIZE
# A page whose start is within REACH of `near` has every byte within 2**31 of
# it, so rel32 jumps and RIP-relative displacements from any slot still fit.
REACH = 2**31 - PAGE_SIZE

_PAGE_MASK = ~(PAGE_SIZE - 1)


class SlotMapError(PyprobesError, RuntimeError):
    """No slot page could be mapped within reach of the requested address."""


class SlotHost(Protocol):
    """What the cache needs from the traced process.

    The probe engine implements it with injected syscalls and ptrace.
    """

    def map_page(self, near: int) -> int:
        """Map one PAGE_SIZE r-x page within REACH of `near`; return its address.

        Raise SlotMapError if impossible.
        """
        ...

    def unmap_page(self, address: int) -> None:
        ...

    def freeze_and_migrate(self, inside: Callable[[int], bool]) -> int:
        """Stop every thread; step out each one whose RIP satisfies inside(rip).

        Return how many threads were migrated.  Threads stay frozen.  If this
        raises, the cache still calls thaw(), so thaw() must cope with a
        partial freeze.
        """
        ...

    def thaw(self) -> None:
        ...


@dataclass(frozen=True)
class Slot:
    address: int
    page: int
    index: int
    # Bumped on every hand-out, so a stale handle to a slot that was freed and
    # handed out again compares unequal and cannot free the new owner's slot.
    generation: int = field(default=0, repr=False)


def in_reach(page: int, near: int) -> bool:
    """True when every byte of the page at `page` is usable from code at `near`."""
    return abs(page - near) <= REACH


class _Page:
    __slots__ = ("address", "used", "garbage", "generations", "full")

    def __init__(self, address: int, slots: int) -> None:
        self.address = address
        self.full = (1 << slots) - 1
        # Bit i set: slot i is handed out (used) / freed dirty, not yet collected
        # (garbage).  A slot in neither mask is free.
        self.used = 0
        self.garbage = 0
        self.generations = [0] * slots

    def free_mask(self) -> int:
        return self.full & ~(self.used | self.garbage)

    def empty(self) -> bool:
        return not (self.used or self.garbage)


class SlotCache:
    """Hands out slots near the code they serve and reclaims them safely.

    Page-retention policy (the kernel keeps its last page so the next probe
    need not map one again): a page left with no used and no garbage slot is
    unmapped unless no other mapped page lies within REACH of it, i.e. one page
    is kept per ±2 GiB neighbourhood.  This applies both after a collection and
    after a clean free empties a page (as the kernel's collect_one_slot does).

    Bounds (shown by tests/slots):
    - freezes <= ceil(dirty frees / SLOTS_PER_PAGE) + no_free_slot, plus any
      explicit collect_garbage() call that found garbage: trigger 1 needs more
      than SLOTS_PER_PAGE dirty frees since the last collection, trigger 2 a
      get() that found no free slot in reach.
    - a page is mapped only when every page within REACH of `near` is full of
      used slots (garbage in reach is collected first), so for neighbourhoods
      more than 2*REACH apart, pages in a neighbourhood never exceed
      ceil(peak simultaneously used slots there / SLOTS_PER_PAGE).
    If a collection fails (the host raises) its garbage stays garbage and the
    next trigger retries it.
    """

    def __init__(self, host: SlotHost, slot_size: int = SLOT_SIZE) -> None:
        if slot_size <= 0 or PAGE_SIZE % slot_size:
            raise ValueError(f"slot size {slot_size} does not divide the {PAGE_SIZE}-byte page")
        self._host = host
        self.slot_size = slot_size
        # The seed's bounds below say SLOTS_PER_PAGE: for this cache, slots_per_page.
        self.slots_per_page = PAGE_SIZE // slot_size
        self._pages: dict[int, _Page] = {}
        self._addrs: list[int] = []  # sorted addresses of every mapped page
        self._open: list[int] = []  # sorted addresses of pages with a free slot
        self._generation = 0
        self._used = 0
        self._garbage = 0
        self._collections = 0
        self._freezes = 0
        self._threads_migrated = 0
        self._no_free_slot = 0

    # ---------------------------------------------------------------- get

    def get(self, near: int) -> Slot:
        """Return a free slot within REACH of `near`.

        Reuses a page in reach when one has a free slot.  Otherwise, if garbage
        lies in reach, collects first (the seed's second trigger); maps a new
        page near `near` only if there is still no free slot in reach.
        """
        page = self._open_page_in_reach(near)
        if page is None:
            self._no_free_slot += 1
            if self._garbage_in_reach(near):
                self._collect(keep_near=near)
                page = self._open_page_in_reach(near)
            if page is None:
                page = self._map(near)
        return self._hand_out(page)

    def _open_page_in_reach(self, near: int) -> _Page | None:
        i = bisect.bisect_left(self._open, near - REACH)
        if i < len(self._open) and self._open[i] <= near + REACH:
            return self._pages[self._open[i]]
        return None

    def _garbage_in_reach(self, near: int) -> bool:
        # Only on the no-free-slot path, which ends in a freeze or an mmap
        # anyway, so a scan of the pages in reach costs nothing by comparison.
        lo = bisect.bisect_left(self._addrs, near - REACH)
        hi = bisect.bisect_right(self._addrs, near + REACH)
        return any(self._pages[a].garbage for a in self._addrs[lo:hi])

    def _map(self, near: int) -> _Page:
        address = self._host.map_page(near)
        if address & ~_PAGE_MASK:
            raise SlotMapError(f"host mapped an unaligned slot page at {address:#x}")
        if address in self._pages:
            raise SlotMapError(f"host mapped {address:#x} twice")
        if not in_reach(address, near):
            # Out of reach is useless to the caller: give it back rather than leak it.
            self._host.unmap_page(address)
            raise SlotMapError(
                f"host mapped {address:#x}, beyond ±{REACH:#x} of {near:#x}"
            )
        page = _Page(address, self.slots_per_page)
        self._pages[address] = page
        bisect.insort(self._addrs, address)
        bisect.insort(self._open, address)
        return page

    def _hand_out(self, page: _Page) -> Slot:
        free = page.free_mask()
        index = (free & -free).bit_length() - 1  # lowest free slot, for locality
        page.used |= 1 << index
        if not page.free_mask():
            self._remove_sorted(self._open, page.address)
        self._generation += 1
        page.generations[index] = self._generation
        self._used += 1
        return Slot(page.address + index * self.slot_size, page.address, index, self._generation)

    # --------------------------------------------------------------- free

    def free(self, slot: Slot, dirty: bool) -> None:
        """Give back a slot obtained from get().

        Clean (only ever single-stepped) slots are free at once; dirty (ran
        boosted) slots become garbage until a collection.  When garbage exceeds
        SLOTS_PER_PAGE a collection runs here (the seed's first trigger); if it
        raises, the slot has nevertheless been freed (it stays garbage).
        """
        page = self._pages.get(slot.page)
        if (
            page is None
            or not 0 <= slot.index < self.slots_per_page
            or slot.address != slot.page + slot.index * self.slot_size
            or page.generations[slot.index] != slot.generation
        ):
            raise ValueError(f"{slot!r} was not handed out by this cache")
        bit = 1 << slot.index
        if not page.used & bit:
            raise ValueError(f"{slot!r} is already free")
        page.used &= ~bit
        self._used -= 1
        if dirty:
            page.garbage |= bit
            self._garbage += 1
            if self._garbage > self.slots_per_page:
                self._collect(keep_near=None)
            return
        if page.free_mask() == bit:  # it had been full
            bisect.insort(self._open, page.address)
        if page.empty():
            self._retire_empty([page.address], keep_near=None)

    # ------------------------------------------------------------ collect

    def collect_garbage(self) -> int:
        """Reclaim every garbage slot under one freeze; return how many.

        No garbage means no freeze.
        """
        return self._collect(keep_near=None)

    def _collect(self, keep_near: int | None) -> int:
        if not self._garbage:
            return 0
        self._freezes += 1
        try:
            migrated = self._host.freeze_and_migrate(self._inside_garbage)
            self._threads_migrated += migrated
            # Only now, with every thread frozen outside garbage, may garbage
            # become free: a thread stopped mid-slot would otherwise resume
            # into whatever the next owner writes there.
            reclaimed = 0
            emptied = []
            for page in self._pages.values():
                if not page.garbage:
                    continue
                reclaimed += page.garbage.bit_count()
                had_free = bool(page.free_mask())
                page.garbage = 0
                if not had_free:
                    bisect.insort(self._open, page.address)
                if page.empty():
                    emptied.append(page.address)
            self._garbage -= reclaimed
            self._collections += 1
            self._retire_empty(emptied, keep_near)
            return reclaimed
        finally:
            self._host.thaw()

    def _inside_garbage(self, rip: int) -> bool:
        page = self._pages.get(rip & _PAGE_MASK)
        if page is None:
            return False
        return bool(page.garbage >> ((rip - page.address) // self.slot_size) & 1)

    def _retire_empty(self, candidates: list[int], keep_near: int | None) -> None:
        """Unmap empty pages, keeping one per ±2 GiB neighbourhood.

        keep_near: a get() is waiting for a slot near this address, so keep
        one empty page in its reach rather than unmap it and map a fresh one.
        """
        errors: list[BaseException] = []
        kept_for_caller = False
        for address in sorted(candidates):
            if keep_near is not None and not kept_for_caller and in_reach(address, keep_near):
                kept_for_caller = True
                continue
            if not self._has_neighbour(address):
                continue
            try:
                self._host.unmap_page(address)
            except Exception as exc:  # keep it as a usable empty page; report after
                errors.append(exc)
                continue
            self._forget(address)
        if errors:
            raise errors[0]

    def _has_neighbour(self, address: int) -> bool:
        i = bisect.bisect_left(self._addrs, address)
        return (i > 0 and address - self._addrs[i - 1] <= REACH) or (
            i + 1 < len(self._addrs) and self._addrs[i + 1] - address <= REACH
        )

    def _forget(self, address: int) -> None:
        page = self._pages.pop(address)
        self._remove_sorted(self._addrs, address)
        if page.free_mask():
            self._remove_sorted(self._open, address)

    @staticmethod
    def _remove_sorted(addrs: list[int], address: int) -> None:
        i = bisect.bisect_left(addrs, address)
        assert i < len(addrs) and addrs[i] == address
        del addrs[i]

    # ------------------------------------------------------------ queries

    def contains(self, address: int) -> bool:
        """Is `address` inside any mapped slot page?  O(1): asked on every stop."""
        return (address & _PAGE_MASK) in self._pages

    def slot_at(self, address: int) -> Slot | None:
        """The slot containing `address` (used, garbage or free), or None.

        For a used slot this equals the handle get() returned.
        """
        page = self._pages.get(address & _PAGE_MASK)
        if page is None:
            return None
        index = (address - page.address) // self.slot_size
        return Slot(
            page.address + index * self.slot_size, page.address, index, page.generations[index]
        )

    def stats(self) -> dict[str, int]:
        return {
            "pages": len(self._pages),
            "slots_used": self._used,
            "garbage": self._garbage,
            "collections": self._collections,
            "freezes": self._freezes,
            "threads_migrated": self._threads_migrated,
            "no_free_slot": self._no_free_slot,
        }

    # ------------------------------------------------------------- detach

    def release_all(self) -> None:
        """Unmap every page, used or not.  No freeze: at detach the caller has
        already migrated threads out / frozen the tracee.

        A page whose unmap fails stays known (and mapped); the first error is
        raised after trying every page.
        """
        errors: list[BaseException] = []
        for address in list(self._addrs):
            try:
                self._host.unmap_page(address)
            except Exception as exc:
                errors.append(exc)
                continue
            page = self._pages[address]
            self._used -= page.used.bit_count()
            self._garbage -= page.garbage.bit_count()
            self._forget(address)
        if errors:
            raise errors[0]

