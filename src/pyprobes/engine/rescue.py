"""A traced program survives its tracer's death: the rescue handler for SIGTRAP (x86/rescue.py).

If pyprobes is killed, its int3 bytes stay in the text: without help, the next thread to hit one
(or one stopped at one when the tracer died, whose stop still carries its SIGTRAP) dies of
SIGTRAP, as under a killed gdb. So when the first probe point is armed, a program with no
SIGTRAP disposition of its own (default, not caught or ignored) and no seccomp filter gets a
handler of ours: a code page, a data mapping, and one injected rt_sigaction. After the tracer's
death a trap on one of our int3 bytes writes the original byte back and reruns the instruction in
place, so each probe traps at most once more; any other SIGTRAP takes the default action as
before. While the tracer lives, ptrace sees every SIGTRAP first and the handler never runs.

The table follows the armed probe points (arm() before the int3 goes in, disarm() after it is
out). detach puts the program's disposition back and unmaps both mappings (invariant 3); an exec
takes them with the old image. Known limits (README "Known limits"): a return probe's trampoline
(the real return addresses live in the tracer), signals the tracer held for a thread, and a
tracer killed in the middle of an injected system call.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol, TypeVar

from ..errors import PyprobesError
from ..slots import PAGE_SIZE
from ..tracee import Tracee, syscalls
from ..tracee.procfs import status_fields
from ..x86.rescue import (DATA_ACTION_OFFSET, DATA_COUNT_OFFSET, DATA_DEFAULT_OFFSET, DATA_HEADER_SIZE,
                          DATA_OLD_ACTION_OFFSET, DATA_POINTER_OFFSET, ENTRY_SIZE, HANDLER_OFFSET,
                          SIG_DFL, SIGACTION_SIZE, SIGTRAP, code_page, data_header, entry,
                          sigaction_handler, trap_entries)

if TYPE_CHECKING:
    from .probe import ProbePoint

T = TypeVar("T")
INITIAL_ENTRIES = (PAGE_SIZE - DATA_HEADER_SIZE) // ENTRY_SIZE


class RescueHost(Protocol):
    """Pages and injected system calls (engine/slothost.py's TraceeSlotHost provides them)."""

    def map_page(self, near: int) -> int: ...

    def unmap_page(self, address: int) -> None: ...

    def inject(self, call: Callable[[int], T]) -> T: ...


def _data_size(capacity: int) -> int:
    return -(-(DATA_HEADER_SIZE + capacity * ENTRY_SIZE) // PAGE_SIZE) * PAGE_SIZE


class Rescue:
    """The rescue handler of one traced process: installed or refused (and why), and its table."""

    def __init__(self, tracee: Tracee, host: RescueHost) -> None:
        self.tracee = tracee
        self.memory = tracee.memory
        self.host = host
        self.refused: str | None = None  # why the program has no rescue handler
        self.code: int | None = None     # the code page, once installed
        self.data = 0                    # the data mapping: header, then entries
        self.capacity = 0
        self._keys: list[int] = []           # the entries' keys, in table order
        self._entries: list[bytes] = []
        self._position: dict[int, int] = {}  # key -> index in the table
        self._owner: dict[int, int] = {}     # key -> address of the probe point it is for

    @property
    def installed(self) -> bool:
        return self.code is not None

    # ------------------------------------------------------------------ the table
    def arm(self, point: "ProbePoint") -> None:
        """POINT's int3 is about to go in: its entries go into the table first."""
        if self.code is None and (self.refused is not None or not self._install(point.address)):
            return
        slot = point.slot.address if point.slot is not None else None
        wanted = trap_entries(point.insn, slot, point.emulation is not None)
        if len(self._keys) + len(wanted) > self.capacity:
            self._grow(len(self._keys) + len(wanted))
        for key, resume, original in wanted:
            # A breakpoint's own entry wins over a place another point may have left a thread.
            if key in self._position and (original is None or self._heals(key)):
                continue
            self._put(key, entry(key, resume, original), point.address)
        self._write_count()

    def disarm(self, point: "ProbePoint") -> None:
        """POINT's int3 is out: its entries leave the table."""
        if self.code is None:
            return
        for key in [k for k, owner in self._owner.items() if owner == point.address]:
            self._drop(key)
        self._write_count()

    def _heals(self, key: int) -> bool:
        return self._entries[self._position[key]][16:] != bytes(8)

    def _put(self, key: int, raw: bytes, owner: int) -> None:
        at = self._position.get(key)
        if at is None:
            at = len(self._keys)
            self._keys.append(key)
            self._entries.append(raw)
            self._position[key] = at
        else:
            self._entries[at] = raw
        self._owner[key] = owner
        self.memory.write(self.data + DATA_HEADER_SIZE + at * ENTRY_SIZE, raw)

    def _drop(self, key: int) -> None:
        # The last entry moves into the hole before the count shrinks: a handler reading the
        # table at any moment in between (the tracer killed here) finds every live entry.
        at = self._position.pop(key)
        del self._owner[key]
        last_key, last = self._keys.pop(), self._entries.pop()
        if last_key != key:
            self._keys[at], self._entries[at] = last_key, last
            self._position[last_key] = at
            self.memory.write(self.data + DATA_HEADER_SIZE + at * ENTRY_SIZE, last)

    def _write_count(self) -> None:
        self.memory.write_u64(self.data + DATA_COUNT_OFFSET, len(self._keys))

    def _grow(self, need: int) -> None:
        """A bigger data mapping, filled, then switched to with one pointer write."""
        capacity = max(need, self.capacity * 2)
        size = _data_size(capacity)
        new = self.host.inject(lambda tid: syscalls.mmap(
            self.tracee, tid, 0, size, syscalls.PROT_READ | syscalls.PROT_WRITE,
            syscalls.MAP_PRIVATE | syscalls.MAP_ANONYMOUS))
        header = self.memory.read(self.data, DATA_HEADER_SIZE)
        self.memory.write(new, header + b"".join(self._entries))
        self.memory.write_u64(self.code + DATA_POINTER_OFFSET, new)
        old, old_size = self.data, _data_size(self.capacity)
        self.data, self.capacity = new, capacity
        self.host.inject(lambda tid: syscalls.munmap(self.tracee, tid, old, old_size))

    # ------------------------------------------------------------------ installing and removing
    def _install(self, near: int) -> bool:
        status = status_fields(self.tracee.pid, "SigCgt", "SigIgn", "Seccomp")
        disposed = int(status.get("SigCgt", "0"), 16) | int(status.get("SigIgn", "0"), 16)
        if disposed & 1 << (SIGTRAP - 1):
            self.refused = "the program catches or ignores SIGTRAP itself"
            return False
        if status.get("Seccomp", "0") != "0":
            self.refused = "seccomp: no system call is injected for it"
            return False
        capacity = INITIAL_ENTRIES
        try:
            code = self.host.map_page(near)
        except (OSError, PyprobesError) as e:
            self.refused = f"no page for it: {e}"
            return False
        self.code = code
        try:
            self.data = self.host.inject(lambda tid: syscalls.mmap(
                self.tracee, tid, 0, _data_size(capacity), syscalls.PROT_READ | syscalls.PROT_WRITE,
                syscalls.MAP_PRIVATE | syscalls.MAP_ANONYMOUS))
            self.capacity = capacity
            self.memory.write(self.data, data_header(code))
            self.memory.write(code, code_page(self.data))
            old = self._sigaction(self.data + DATA_ACTION_OFFSET)
            if sigaction_handler(old) != SIG_DFL:  # the program set one a moment ago: keep it
                self._sigaction(self.data + DATA_OLD_ACTION_OFFSET)
                raise PyprobesError("the program catches or ignores SIGTRAP itself")
            # The handler's "not ours" path and detach put back exactly what the program had.
            self.memory.write(self.data + DATA_DEFAULT_OFFSET, old)
        except (OSError, PyprobesError) as e:
            self._unmap()
            self.refused = str(e)
            return False
        return True

    def _sigaction(self, action: int) -> bytes:
        """SIGTRAP's disposition set to the struct sigaction at ACTION; the one it replaced.
        (The kernel reads the new one before it writes the old: ACTION may be the old one's place.)"""
        old = self.data + DATA_OLD_ACTION_OFFSET
        self.host.inject(lambda tid: syscalls.rt_sigaction(self.tracee, tid, SIGTRAP, action, old))
        return self.memory.read(old, SIGACTION_SIZE)

    def release(self) -> None:
        """At detach, with no int3 of ours left: the program's disposition back, our mappings gone.
        A handler the program installed meanwhile over ours stays."""
        if self.code is None:
            return
        replaced = self._sigaction(self.data + DATA_DEFAULT_OFFSET)
        if sigaction_handler(replaced) != self.code + HANDLER_OFFSET:
            self._sigaction(self.data + DATA_OLD_ACTION_OFFSET)
        self._unmap()

    def _unmap(self) -> None:
        code, data, size = self.code, self.data, _data_size(self.capacity)
        self.forget()
        if data:
            self.host.inject(lambda tid: syscalls.munmap(self.tracee, tid, data, size))
        if code is not None:
            self.host.unmap_page(code)

    def forget(self) -> None:
        """After an exec (the image took handler and mappings with it), or once removed."""
        self.code = None
        self.data = self.capacity = 0
        self.refused = None
        self._keys.clear()
        self._entries.clear()
        self._position.clear()
        self._owner.clear()
