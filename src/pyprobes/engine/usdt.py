"""USDT semaphores held while probes are placed.

A USDT probe with a semaphore fires only while the program sees the semaphore non-zero (the
program skips preparing the arguments otherwise), so placing such a probe adds one to the
2-byte counter in the tracee and removing it subtracts one: other tracers (bpftrace,
SystemTap) count the same way, and the value goes back exactly to what it was.
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from .probe import ProbeError

if TYPE_CHECKING:
    from ..symbols import Target

__all__ = ["Semaphores"]


class Memory(Protocol):
    def read(self, address: int, size: int) -> bytes: ...
    def write(self, address: int, data: bytes) -> None: ...


class Semaphores:
    """Runtime semaphore address -> how many of our probes hold it."""

    def __init__(self, memory: Memory) -> None:
        self.memory = memory
        self.held: dict[int, int] = {}

    def _add(self, address: int, delta: int) -> None:
        (value,) = struct.unpack("<H", self.memory.read(address, 2))
        self.memory.write(address, struct.pack("<H", (value + delta) & 0xFFFF))

    def hold_for(self, target: "Target") -> int | None:
        """Raise the semaphore of TARGET's USDT probe, if it has one; its runtime address.
        ProbeError (nothing raised) if the program's memory cannot be written."""
        usdt = target.usdt
        if usdt is None or not usdt.semaphore:
            return None
        address = target.module.to_runtime(usdt.semaphore)
        try:
            self.acquire(address)
        except OSError as e:
            raise ProbeError(f"{target.name}: cannot raise its USDT semaphore at 0x{address:x}: "
                             f"{e.strerror or e}") from None
        return address

    def acquire(self, address: int) -> None:
        self._add(address, 1)
        self.held[address] = self.held.get(address, 0) + 1

    def release(self, address: int) -> None:
        """One hold less; nothing if the address was forgotten (its module unmapped, an exec)."""
        count = self.held.get(address)
        if not count:
            return
        if count == 1:
            del self.held[address]
        else:
            self.held[address] = count - 1
        self._add(address, -1)

    def restore_forked_child(self, memory: Memory, parent_tid: int) -> None:
        """A forked child, let go untraced, copied our raised semaphores: lowered in its memory."""
        for address, count in self.held.items():
            try:
                (value,) = struct.unpack("<H", memory.read(address, 2))
                memory.write(address, struct.pack("<H", (value - count) & 0xFFFF))
            except OSError:
                pass

    def release_all(self) -> None:
        """Every hold given back (detach)."""
        for address, count in list(self.held.items()):
            try:
                self._add(address, -count)
            except OSError:
                pass
        self.held.clear()

    def forget_in(self, inside: Callable[[int], bool]) -> None:
        """Holds in memory that is gone: dropped with nothing written."""
        for address in [a for a in self.held if inside(a)]:
            del self.held[address]

    def forget(self) -> None:
        self.held.clear()
