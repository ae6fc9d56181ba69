"""A stopped thread's user stack, unwound with the modules' call frame information.

Frame pointers are no help on distribution builds (Debian compiles with
-fomit-frame-pointer), so each step takes the CFA row of the module containing the pc
(symbols/cfi.py, parsed once per module) and computes the caller's registers from it, as
libgcc's unwinder and gdb do. The registers are named only by their DWARF numbers; x86/arch.py
says which `Regs` field each number is.

Bounds: the stack is read once per unwind, one process_vm_readv of at most STACK_SLICE bytes
from the stack pointer (less where the mapping ends); a saved value outside that slice ends the
unwind, as do a pc outside every module, a pc without an FDE, an undefined return address
(the outermost frame) and MAX_DEPTH frames.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from ..symbols import Module, Target, modules, symbolize
from ..symbols.cfi import EXPRESSION, OFFSET, REGISTER, UNDEFINED, VAL_EXPRESSION, VAL_OFFSET, cfi_of, \
    evaluate_expression
from ..x86.arch import DWARF_REGISTERS, DWARF_RETURN_ADDRESS, DWARF_STACK_POINTER

__all__ = ["Frame", "StackReader", "Unwinder", "MAX_DEPTH", "STACK_SLICE"]

MAX_DEPTH = 64
STACK_SLICE = 64 * 1024
_FRAME_CACHE = 65536  # symbolised pcs kept per process; a hit's frames repeat, a trace's pcs are few
_U64 = struct.Struct("<Q")


class StackReader(Protocol):
    def read_upto(self, address: int, size: int) -> bytes: ...


# real_return(tid, slot, value): the return address a frame really has when the stack slot SLOT
# holds VALUE; a return probe's trampoline stands there for the caller it hijacked.
RealReturn = Callable[[int, int, int], int]


@dataclass(frozen=True)
class Frame:
    """One frame: its pc (the probed address in frame 0, a return address above it) and where
    that is. ``name`` is `module:symbol+0xoff`, or `module:0xLINKADDR` without a symbol."""

    pc: int
    target: Target | None

    @property
    def name(self) -> str:
        if self.target is None:
            return f"0x{self.pc:x}"
        return self.target.name

    @property
    def function(self) -> str:
        """The symbol alone ("stk_c"), or the name when there is none: what gdb's `bt` shows."""
        sym = self.target.symbol if self.target is not None else None
        return sym.name if sym is not None else self.name


class _Slice:
    """The bytes of the stack read once at the start; reads outside them are None."""

    __slots__ = ("base", "data")

    def __init__(self, base: int, data: bytes) -> None:
        self.base, self.data = base, data

    def u64(self, address: int) -> int | None:
        i = address - self.base
        if 0 <= i <= len(self.data) - 8:
            return _U64.unpack_from(self.data, i)[0]
        return None


class Unwinder:
    """Unwinds threads of process PID; keeps its modules until a pc falls outside all of them
    (a library loaded since) or GENERATION() changes (the dynamic loader reported a change),
    then reads them again. Each pc's module and symbolised frame are kept with the modules
    they came from."""

    def __init__(self, pid: int, memory: StackReader,
                 load_modules: Callable[[int], list[Module]] = modules,
                 real_return: RealReturn | None = None,
                 generation: Callable[[], int] = lambda: 0) -> None:
        self.pid = pid
        self.memory = memory
        self.real_return = real_return
        self._generation = generation
        self._seen_generation = generation()
        self._load_modules = load_modules
        self._modules: list[Module] | None = None
        self._frames: dict[tuple[int, bool], tuple[Module, Frame]] = {}

    def _reload(self) -> None:
        self._modules = self._load_modules(self.pid)
        self._frames.clear()

    def _frame(self, pc: int, returned_to: bool, refreshed: list[bool]) -> tuple[Module | None, Frame]:
        known = self._frames.get((pc, returned_to))
        if known is not None:
            return known
        # Above frame 0 the pc is a return address: the call is the instruction before it,
        # and the caller may end with that call (noreturn), so look up pc - 1.
        lookup = pc - 1 if returned_to else pc
        mod = self._module_at(lookup, refreshed)
        frame = Frame(pc, _symbolized(pc, lookup, mod))
        if mod is not None:
            if len(self._frames) >= _FRAME_CACHE:
                self._frames.clear()
            self._frames[(pc, returned_to)] = (mod, frame)
        return mod, frame

    def _module_at(self, pc: int, refreshed: list[bool]) -> Module | None:
        if self._modules is None:
            self._reload()
            refreshed[0] = True
        for mod in self._modules:
            if mod.mapping_at(pc) is not None:
                return mod
        if not refreshed[0]:
            refreshed[0] = True
            self._reload()
            return self._module_at(pc, refreshed)
        return None

    def unwind(self, tid: int, regs: Any, max_depth: int = MAX_DEPTH) -> list[Frame]:
        """The frames of thread TID, stopped with registers REGS (a `Regs`), innermost first."""
        generation = self._generation()
        if generation != self._seen_generation:
            self._seen_generation = generation
            self._modules = None
            self._frames.clear()
        values: dict[int, int] = {n: getattr(regs, name) for n, name in DWARF_REGISTERS.items()
                                 if n <= DWARF_RETURN_ADDRESS}
        sp = values[DWARF_STACK_POINTER]
        stack = _Slice(sp, self.memory.read_upto(sp, STACK_SLICE))
        refreshed = [False]
        frames: list[Frame] = []
        pc = values[DWARF_RETURN_ADDRESS]
        returned_to = False  # frame 0, and a frame a signal interrupted, are at their pc exactly
        while len(frames) < max_depth:
            mod, frame = self._frame(pc, returned_to, refreshed)
            frames.append(frame)
            if mod is None:
                break
            step = _step(values, mod, pc - 1 if returned_to else pc, stack, tid, self.real_return)
            if step is None:
                break
            caller, returned_to = step
            if caller[DWARF_STACK_POINTER] <= values[DWARF_STACK_POINTER] and \
                    caller[DWARF_RETURN_ADDRESS] == pc:
                break  # no progress: a corrupt table or stack would loop here
            values = caller
            pc = values[DWARF_RETURN_ADDRESS]
            if pc == 0:
                break
        return frames


def _symbolized(pc: int, lookup: int, mod: Module | None) -> Target | None:
    if mod is None:
        return None
    target = symbolize(lookup, [mod])
    if target is None or lookup == pc:
        return target
    # Named by the call's function, offset from the return address itself, as gdb shows it.
    return Target(pc, target.module, target.symbol, target.symbol_address, pc - target.symbol_address,
                  target.spec)


def _step(values: dict[int, int], mod: Module, lookup: int, stack: _Slice, tid: int,
          real_return: RealReturn | None) -> tuple[dict[int, int], bool] | None:
    """The caller's registers (only those known) and whether its pc is a return address (not
    where a signal interrupted it); None where the unwind must stop."""
    row = cfi_of(mod.elf).row_at(mod.to_link(lookup))
    if row is None:
        return None
    if row.cfa_expression is not None:
        cfa = evaluate_expression(row.cfa_expression, values.get, stack.u64)
    else:
        base = values.get(row.cfa_register)
        cfa = None if base is None else base + row.cfa_offset
    if cfa is None:
        return None
    caller = dict(values)
    for reg, rule in row.rules.items():
        kind, arg = rule
        value: int | None
        if kind == OFFSET:
            value = stack.u64(cfa + arg)
            if value is not None and real_return is not None and reg == row.return_register:
                value = real_return(tid, cfa + arg, value)
        elif kind == VAL_OFFSET:
            value = cfa + arg
        elif kind == REGISTER:
            value = values.get(arg)
        elif kind == EXPRESSION:
            address = evaluate_expression(arg, values.get, stack.u64)
            value = None if address is None else stack.u64(address)
        elif kind == VAL_EXPRESSION:
            value = evaluate_expression(arg, values.get, stack.u64)
        else:
            assert kind == UNDEFINED
            value = None
        if value is None:
            caller.pop(reg, None)
        else:
            caller[reg] = value
    ra = caller.get(row.return_register)
    if ra is None or row.return_register not in row.rules:
        return None  # the outermost frame (_start marks its return address undefined)
    caller[DWARF_STACK_POINTER] = cfa
    caller[DWARF_RETURN_ADDRESS] = ra
    return caller, not row.signal_frame
