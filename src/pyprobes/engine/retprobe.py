"""Return probes (kretprobes / uretprobes): return values and latency through a shadow stack.

At a function's entry the return address on the stack is replaced by the address of a return
trampoline, a breakpoint in a page of ours. Each thread keeps a shadow stack of (original return
address, where it was on the stack, probe, entry time, entry data). When the function returns,
the thread traps on the trampoline; the tracer pops the matching entry, sends it to the real
return address and reports the return value and the elapsed time.

A frame left without returning (longjmp, an exception) leaves its entry behind; since the
stack grows down, an entry whose stack slot lies below the current stack pointer is dead and is
dropped on the thread's next entry or return (uprobes' arch_uretprobe_is_alive). A tail call
from a hijacked frame finds the trampoline in its return address slot: its entry is chained
on the same slot, and both return together. Every way of leaving the process — detach, fork, a C++ throw, a forced
unwind — first writes the hijacked return addresses back, so no frame is left returning into a
page that is about to vanish or was never there. The unwinder is probed wherever it is loaded,
at the first return probe or later (a subscriber to the loader's events, loader.py).

Where the return address is, which register holds the return value and what the trampoline
holds are x86's (x86/arch.py, as arch_prepare_kretprobe in the kernel).
"""
from __future__ import annotations

import struct
import time
from typing import TYPE_CHECKING, Any, Callable, Protocol

from ..slots import PAGE_SIZE
from ..symbols import Target, main_module, modules
from ..tracee import Memory, Regs, Tracee
from ..x86 import (BREAKPOINT, BREAKPOINT_LENGTH, popped_return_slot, return_address_slot, return_value,
                   set_instruction_pointer, stack_pointer)
from .probe import ProbeError, ProbePlacer

if TYPE_CHECKING:
    from .loader import LoaderEvents
    from .ring import Ring
    from .probe import Probe

ReturnHandler = Callable[[int, "ReturnValue", int, Any], Any]
EntryHandler = Callable[[int, Any], Any]
DEFAULT_MAXACTIVE = 64
# Where an exception starts unwinding: from here on return addresses are read by the unwinder,
# which cannot find a frame for a trampoline address (and would call std::terminate).
UNWIND_ENTRIES = ("_Unwind_RaiseException", "_Unwind_ForcedUnwind", "_Unwind_Resume_or_Rethrow")
TRAMPOLINE_BYTES = 16


class PageMapper(Protocol):
    """Mapping a page of ours into the tracee near an address (the slot host does it)."""

    def map_page(self, near: int) -> int: ...

    def unmap_page(self, address: int) -> None: ...


class ReturnValue(int):
    """rax as an int; .double / .xmm0 read the floating-point return (valid inside the handler only)."""

    _tid: int
    _tracee: Tracee

    @property
    def xmm0(self) -> bytes:
        return self._tracee.get_xmm0(self._tid)

    @property
    def double(self) -> float:
        return struct.unpack("<d", self.xmm0[:8])[0]

    @property
    def signed(self) -> int:
        return self - (1 << 64) if self >= 1 << 63 else int(self)


class ShadowEntry:
    __slots__ = ("return_address", "stack_slot", "probe", "start_ns", "data")

    def __init__(self, return_address: int, stack_slot: int, probe: "ReturnProbe", start_ns: int, data: Any) -> None:
        self.return_address = return_address
        self.stack_slot = stack_slot
        self.probe = probe
        self.start_ns = start_ns
        self.data = data


class ReturnProbe:
    """hits: returns reported; missed: calls not hijacked (depth limit) or whose handler failed;
    dropped: frames left without returning (longjmp, exceptions)."""

    def __init__(self, returns: "ReturnProbes", target: Target, handler: ReturnHandler | None,
                 entry: EntryHandler | None, maxactive: int) -> None:
        self._returns = returns
        self.target = target
        self.handler = handler
        self.entry = entry
        self.maxactive = maxactive
        self.hits = 0
        self.missed = 0
        self.dropped = 0
        self.removed = False
        self.last_error: BaseException | None = None
        self.entry_probe: Probe | None = None

    @property
    def name(self) -> str:
        return self.target.name + "%return"

    @property
    def address(self) -> int:
        return self.target.address

    @property
    def mode(self) -> str:
        """How its calls are followed: "return" (two stops per call; an in-process return
        probe says "optimized" once its entry is jump-optimised)."""
        return "return"

    def remove(self) -> None:
        """Stop hijacking new calls; calls in flight still report their return."""
        if not self.removed:
            self.removed = True
            if self.entry_probe is not None:
                self.entry_probe.remove()

    def __repr__(self) -> str:
        return f"<ReturnProbe {self.name} hits={self.hits} missed={self.missed} dropped={self.dropped}>"


class ReturnProbes:
    """Every return probe of one process, the trampoline, and each thread's shadow stack."""

    def __init__(self, placer: ProbePlacer, tracee: Tracee, pages: PageMapper, loader: "LoaderEvents",
                 ring: "Ring") -> None:
        from .inprocess_returns import InProcessReturns  # it builds on ReturnProbe: imported late
        self._placer = placer
        self._tracee = tracee
        self._memory = tracee.memory
        self._pages = pages
        self._loader = loader
        self._regs = Regs()
        self.trampoline: int | None = None
        self.stacks: dict[int, list[ShadowEntry]] = {}
        self.probes: list[ReturnProbe] = []
        self._unwind_probes: list["Probe"] = []
        self._unwind_seen: set[int] = set()  # addresses of unwinder entries already probed
        self._unwinder_found = False
        self.restored_for_unwind = 0
        self.inprocess = InProcessReturns(self, tracee, pages, ring)  # probes with no stop (issue 12)

    # ------------------------------------------------------------------ placing
    def add(self, target: Target, handler: ReturnHandler | None, entry: EntryHandler | None = None,
            maxactive: int = DEFAULT_MAXACTIVE, action: str | None = None) -> ReturnProbe:
        """A return probe at TARGET: with HANDLER (or ENTRY) followed with two stops per call;
        with neither and an ACTION ("count", "hist", "record"), inside the process where its
        entry takes a jump (inprocess_returns.py)."""
        if action is not None and handler is None and entry is None:
            return self.inprocess.add(target, action, maxactive)
        if target.symbol is None or target.offset != 0:
            raise ProbeError(f"a return probe goes on a function's entry, not {target.name}")
        if maxactive < 1:
            raise ProbeError("maxactive must be at least 1")
        self.ensure_trampoline()
        rp = ReturnProbe(self, target, handler, entry, maxactive)
        rp.entry_probe = self.place_entry(rp)
        self.probes.append(rp)
        return rp

    def place_entry(self, rp: ReturnProbe, action: str | None = None) -> "Probe":
        """RP's entry probe: a breakpoint whose pre-handler follows the call; action="return":
        one the optimizer makes in-process (inprocess_returns.py; a breakpoint until then)."""
        if action is not None:
            return self._placer.add_probe(rp.target, action=action)
        return self._placer.add_probe(rp.target, pre=lambda tid, regs: self.on_entry(rp, tid, regs), boost=True)

    def ensure_trampoline(self) -> None:
        if self.trampoline is not None:
            return
        page = self._pages.map_page(_anchor(self._tracee.pid))
        self._memory.write(page, BREAKPOINT * (TRAMPOLINE_BYTES // len(BREAKPOINT)))
        self.trampoline = page
        self._tracee.breakpoints.own(page)
        self._watch_unwinder()

    def _watch_unwinder(self) -> None:
        """Probe where C++ exceptions start unwinding, in whichever loaded library defines it;
        until one is found, look again each time the loader changes the library list."""
        self._unwinder_found = self._probe_unwinder()
        if not self._unwinder_found:
            # No loader (static): whatever is loaded now is all there will be.
            self._loader.subscribe(self._on_library_change)

    def _probe_unwinder(self) -> bool:
        """Probe every unwinder entry loaded now and not probed yet; whether the one C++ throws
        go through (_Unwind_RaiseException, in libgcc_s) is probed. (glibc's libc has its own
        _Unwind_ForcedUnwind for pthread_exit, which does not make C++ exceptions safe.)"""
        for name in UNWIND_ENTRIES:
            for target in _functions_named(self._tracee.pid, name):
                if target.address in self._unwind_seen:
                    continue
                try:
                    probe = self._placer.add_probe(target, pre=self._on_unwind)
                except ProbeError:
                    continue
                self._unwind_seen.add(target.address)
                self._unwind_probes.append(probe)
        return any(p.name.endswith(":" + UNWIND_ENTRIES[0]) for p in self._unwind_probes)

    def _on_library_change(self) -> None:
        if not self._unwinder_found and self.trampoline is not None:
            self._unwinder_found = self._probe_unwinder()
        if self._unwinder_found:
            self._loader.unsubscribe(self._on_library_change)

    # ------------------------------------------------------------------ the two hits
    def on_entry(self, rp: ReturnProbe, tid: int, regs: Any) -> None:
        if rp.removed:
            return
        slot = return_address_slot(regs)
        stack = self.stacks.get(tid)
        if stack is None:
            stack = self.stacks[tid] = []
        memory = self._memory
        return_address = memory.read_u64(slot)
        # A frame at or below this slot can no longer be live: a new call is using it. Except
        # a tail call from a hijacked frame (a jmp, with the trampoline still in the slot): that
        # frame returns when this one does, so both entries stay and are reported together
        # (kretprobes and uretprobes' "chained" instances).
        while stack and (stack[-1].stack_slot < slot or
                         (stack[-1].stack_slot == slot and return_address != self.trampoline)):
            self._drop(stack.pop())
        if len(stack) >= rp.maxactive:
            rp.missed += 1
            return
        if return_address == self.trampoline and not (stack and stack[-1].stack_slot == slot):
            # No live entry owns this slot: the trampoline was left there by a frame whose
            # entry is gone. Never record the trampoline as somebody's real caller.
            rp.missed += 1
            return
        data = None
        if rp.entry is not None:
            try:
                data = rp.entry(tid, regs)
            except Exception as e:  # counted here, on the return probe, and the call not followed
                rp.missed += 1
                rp.last_error = e
                return
        stack.append(ShadowEntry(return_address, slot, rp, time.perf_counter_ns(), data))
        if return_address != self.trampoline:
            memory.write_u64(slot, self.trampoline)

    def real_return_address(self, tid: int, slot: int, value: int) -> int:
        """The return address thread TID's stack slot SLOT really holds: the hijacked caller
        when VALUE is the trampoline (a stack unwound under a return probe, engine/stack.py)."""
        if value == self.trampoline:
            for entry in self.stacks.get(tid, ()):
                if entry.stack_slot == slot:
                    value = entry.return_address
                    break
        return self.inprocess.real_return_address(tid, slot, value)

    def on_trampoline(self, tid: int, report: bool = True) -> None:
        """A thread returned into the trampoline: send it to its real caller and report.

        Also for a thread stopped on the trampoline before executing its breakpoint (its
        program counter on the trampoline): the `ret` has popped the slot either way."""
        now = time.perf_counter_ns()
        regs = self._tracee.get_regs(tid, self._regs)
        slot = popped_return_slot(regs)
        stack = self.stacks.get(tid) or []
        while stack and stack[-1].stack_slot < slot:
            self._drop(stack.pop())
        if not stack or stack[-1].stack_slot != slot:
            raise ProbeError(f"thread {tid} returned through the trampoline with no matching shadow entry "
                             f"(stack pointer {stack_pointer(regs):#x})")
        # Tail calls chained entries on one slot: each returns now, innermost first.
        done = [stack.pop()]
        while done[-1].return_address == self.trampoline and stack and stack[-1].stack_slot == slot:
            done.append(stack.pop())
        set_instruction_pointer(regs, done[-1].return_address)
        self._tracee.set_regs(tid, regs)
        if not report:
            return
        value = return_value(regs)
        for top in done:
            self._report(top, tid, value, now)

    def _report(self, top: ShadowEntry, tid: int, value: int, now: int) -> None:
        rp = top.probe
        if rp.handler is None:
            rp.hits += 1
            return
        result = ReturnValue(value)
        result._tid = tid
        result._tracee = self._tracee
        try:
            rp.handler(tid, result, now - top.start_ns, top.data)
        except Exception as e:  # a handler's bug must not take the traced program down
            rp.missed += 1
            rp.last_error = e
        else:
            rp.hits += 1

    def _drop(self, entry: ShadowEntry) -> None:
        entry.probe.dropped += 1

    def _on_unwind(self, tid: int, regs: Any) -> None:
        self.restore_thread(tid, self._memory)
        self.inprocess.restore_thread(regs.fs_base)

    # ------------------------------------------------------------------ giving frames back
    def restore_thread(self, tid: int, memory: Memory) -> None:
        """Write TID's hijacked return addresses back into its stack (in MEMORY) and drop the entries."""
        stack = self.stacks.pop(tid, None) or []
        for entry in stack:
            self._write_back(memory, entry)
            self._drop(entry)
            self.restored_for_unwind += 1

    def _write_back(self, memory: Memory, entry: ShadowEntry) -> None:
        try:
            if memory.read_u64(entry.stack_slot) == self.trampoline:
                memory.write_u64(entry.stack_slot, entry.return_address)
        except OSError:
            pass  # the stack is gone (the thread exited): nothing returns there

    def restore_forked_child(self, memory: Memory, parent_tid: int) -> None:
        """A forked child copied the forking thread's stack, hijacked slots included."""
        self.inprocess.restore_forked_child(memory, parent_tid)
        for entry in self.stacks.get(parent_tid, ()):
            self._write_back(memory, entry)

    def restore_all(self) -> None:
        """Detach time (every thread frozen): every frame returns to its real caller later.

        A thread already returned into the trampoline but stopped before (or on) its breakpoint
        would run into an unmapped page: it is sent to its real caller first."""
        if self.trampoline is not None:
            for tid in list(self.stacks):
                try:
                    pc = self._tracee.get_rip(tid)
                except OSError:
                    continue  # exiting
                if pc in (self.trampoline, self.trampoline + BREAKPOINT_LENGTH):
                    try:
                        self.on_trampoline(tid)
                    except ProbeError:
                        pass
        for tid in list(self.stacks):
            for entry in self.stacks.pop(tid):
                self._write_back(self._memory, entry)
        self.inprocess.restore_all()

    def thread_exited(self, tid: int) -> None:
        for entry in self.stacks.pop(tid, ()):
            self._drop(entry)
        self.inprocess.thread_exited(tid)

    def forget(self) -> None:
        """After exec: the old image, its stacks and the trampoline page are gone."""
        self.stacks.clear()
        self.trampoline = None
        for rp in self.probes:
            rp.removed = True
        self.probes.clear()
        self._unwind_probes.clear()
        self._unwind_seen.clear()
        self._unwinder_found = False
        self.inprocess.forget()

    def release(self) -> None:
        """Unmap the trampoline page (only after restore_all, with every thread frozen)."""
        self.inprocess.release()
        if self.trampoline is not None and self._tracee.alive:
            try:
                self._pages.unmap_page(self.trampoline)
            except OSError:
                pass
        self.trampoline = None


def _functions_named(pid: int, name: str) -> list[Target]:
    """Every loaded function called NAME (none is no error: unlike resolve(), no did-you-mean
    search over every symbol, which costs 0.1-0.4 s a miss with libc or libstdc++ loaded)."""
    found: list[Target] = []
    try:
        mods = modules(pid)
    except (OSError, LookupError):
        return found
    for mod in mods:
        for sym in mod.elf.lookup(name):
            address = mod.to_runtime(sym.address)
            if all(t.address != address for t in found):
                found.append(Target(address, mod, sym, address, 0, f"{mod.name}:{name}"))
    return found


def _anchor(pid: int) -> int:
    """Somewhere for the trampoline page: near the main binary, like the slots it serves."""
    try:
        return main_module(pid).base
    except Exception:
        return 0x7F00_0000_0000 - PAGE_SIZE
