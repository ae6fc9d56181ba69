"""Return probes inside the process (issue 12): the engine side of x86/shadow.py's area and routines.

A return probe placed with an action (count, hist, record) and no Python handler follows its
calls with no stop. Its entry probe is a jump-optimised probe of action "return": the record
trampoline's call goes to the shared *entry routine* (through the counter page's second word
from its end, so record and return trampolines share counter pages) with the probe's shadow
id; the routine pushes a frame on the thread's shadow stack in the area and hijacks the return
slot; the function's ``ret`` lands on the *return trampoline*, which pops the frame, adds the
latency to the probe page and jumps to the real caller. The tracer only reads: statistics and
histograms through its own view of the area (a memfd both map), records through the ring.

Until the optimizer's next freeze (or for good, where no jump fits, where the area cannot be
made, where the depth asked differs from the area's, or when a second return probe shares the
function) the entry probe is a breakpoint and its calls are followed the stop-based way
(retprobe.py), into the same probe object: counts stay exact. Why a probe is not in-process:
``ReturnProbe.not_optimized``.

What the tracer does to the area, always with the owning thread stopped (a thread claims and
alone touches its table entry while it runs):

* a thread's exit: its entry's depth set to 0, its frames counted as ``dropped``;
* a C++ throw (the unwinder's probe, retprobe.py): every frame of the thread written back into
  its stack and dropped, so the unwinder reads real return addresses;
* a fork: the forking thread's real return addresses written into the *child's* stack (the area
  is MAP_SHARED: the child's table is ours, so it is never touched on the child's behalf);
* a vfork: the child runs on the parent thread's TLS, so on its entry: the parent's frames are
  kept at the VFORK stop and given back at VFORK_DONE (tracee.vfork_handler);
* detach: with every thread frozen and stepped out of the code page (optimizer.migrate), every
  frame's real return address written back, then the area and the code page unmapped;
* exec: everything forgotten (the statistics read last stay with the probes).

A tracer killed leaves the program working: the patch, trampolines, routines and area are the
program's own memory and need no tracer. What it cannot do then: a C++ exception through a
hijacked frame (no unwinder probe to give the return addresses back; std::terminate).
"""
from __future__ import annotations

import struct
import time
from typing import TYPE_CHECKING, Any, Callable

from ..slots import PAGE_SIZE, SlotMapError
from ..tracee import Memory, Regs, Tracee
from ..x86 import shadow as sx
from .histogram import LatencyHistogram
from .native import measure_overhead_ticks
from .probe import ProbeError
from .ring import ReturnRecord, _TscClock
from .retprobe import ReturnProbe, _anchor

if TYPE_CHECKING:
    from ..symbols import Target
    from .probe import Probe
    from .retprobe import ReturnProbes
    from .ring import Ring

ACTIONS = ("count", "hist", "record")
RETURN_TRAMPOLINE_OFFSET = PAGE_SIZE // 2  # in the code page; the entry routine at its start
_WORD = struct.Struct("<Q")
# each routine fits its half of the code page
assert sx.SHADOW_CODE_BOUND <= RETURN_TRAMPOLINE_OFFSET


class InProcessReturnProbe(ReturnProbe):
    """A return probe followed in the process: hits (returns), missed (depth or thread table
    exhausted), dropped (frames left without returning) come from its probe page, synced when
    run() returns; histogram: latency buckets (x86/shadow.py latency_bucket)."""

    def __init__(self, returns: "ReturnProbes", target: "Target", action: str, maxactive: int) -> None:
        super().__init__(returns, target, None, None, maxactive)
        self.action = action
        self.shadow_id: int | None = None   # its probe page; None: followed the stop-based way
        self.reason = ""                     # why it is not in-process
        self._stats = (0, 0, 0, 0, 0)        # the page's returns, missed, dropped, sum, max at the last sync
        self._page_buckets: list[int] = [0] * sx.BUCKETS  # kept when the page goes (exec)
        self._stopped = LatencyHistogram()   # returns seen the stop-based way
        self._inprocess: "InProcessReturns | None" = None
        self.handler = self._stop_return
        if action == "record":
            self.entry = _entry_arguments

    @property
    def mode(self) -> str:
        """"optimized" when calls are followed in the process, else the entry breakpoint's mode."""
        return self.entry_probe.mode if self.entry_probe is not None else "pending"

    @property
    def not_optimized(self) -> str:
        if self.reason:
            return self.reason
        return self.entry_probe.not_optimized if self.entry_probe is not None else ""

    @property
    def histogram(self) -> LatencyHistogram:
        """The latencies of the returns so far (in-process ones with the trampolines' measured
        overhead subtracted, README), read from the probe page now."""
        owner = self._inprocess
        page = owner.buckets(self) if owner is not None else None
        in_process = LatencyHistogram.from_buckets(page or self._page_buckets, sum_ns=self._stats[3],
                                                   max_ns=self._stats[4])
        return in_process.merge(self._stopped)

    @property
    def overhead_ns(self) -> float:
        """What every in-process latency has subtracted: the trampolines' own cost, measured
        at the start by running them around an empty function in the tracer (engine/native.py)."""
        owner = self._inprocess
        return owner.overhead_ticks * owner.ns_per_tick if owner is not None and self.shadow_id is not None else 0.0

    @property
    def total_latency_ns(self) -> int:
        return self._stats[3] + self._stopped.sum

    @property
    def max_latency_ns(self) -> int:
        return max(self._stats[4], self._stopped.max or 0)

    def _stop_return(self, tid: int, value: int, ns: int, data: Any) -> None:
        """A return seen the stop-based way (its entry was a breakpoint): the same action."""
        self._stopped.add(ns)
        if self.action == "record" and self._inprocess is not None:
            self._inprocess.ring.append(ReturnRecord(time.monotonic_ns(), tid, self, int(value), ns, data))

    def __repr__(self) -> str:
        return (f"<ReturnProbe {self.name} {self.action} {self.mode} hits={self.hits} "
                f"missed={self.missed} dropped={self.dropped}>")


def _entry_arguments(tid: int, regs: Any) -> tuple[int, int, int, int]:
    return (regs.rdi, regs.rsi, regs.rdx, regs.rcx)


class InProcessReturns:
    """The area, the code page and the in-process return probes of one process image."""

    def __init__(self, returns: "ReturnProbes", tracee: Tracee, pages: Any, ring: "Ring",
                 layout: sx.ShadowLayout | None = None) -> None:
        self.returns = returns
        self.tracee = tracee
        self.memory = tracee.memory
        self.pages = pages        # the slot host: map_shared_with_code, unmap_page
        self.ring = ring
        self.layout = layout or sx.ShadowLayout()
        self.area = 0             # the area in the tracee (0: not made)
        self.code = 0             # the r-x page of the two routines
        self.view: Any = None     # the tracer's view of the area
        self.probes: list[InProcessReturnProbe] = []  # shadow id -> probe
        self._by_entry: dict[Any, InProcessReturnProbe] = {}
        self.unavailable = ""     # why the area could not be made (then every probe is stop-based)
        self.ns_per_tick = 1.0
        self.fixed_ns_per_tick = sx.ns_per_tick_fixed(1.0)  # the same as the area's header holds
        self.overhead_ticks = 0
        self._regs = Regs()
        self._vforks: dict[int, list[sx.Frame]] = {}  # a vforking thread's frames, until VFORK_DONE
        tracee.vfork_handler = self.vfork

    # ------------------------------------------------------------------ making
    @property
    def entry_routine(self) -> int:
        return self.code

    @property
    def trampoline(self) -> int:
        return self.code + RETURN_TRAMPOLINE_OFFSET if self.code else 0

    def contains(self, address: int) -> bool:
        """Whether ADDRESS is in the code page (the entry routine or the return trampoline)."""
        return bool(self.code) and self.code <= address < self.code + PAGE_SIZE

    def _ensure(self) -> str:
        """Make the area and the code page at the first in-process probe: "" or why not."""
        if self.area or self.unavailable:
            return self.unavailable
        layout = self.layout
        try:
            self.ns_per_tick = self.ring.ns_per_tick if self.ring.address else _TscClock.calibrate()[0]
            area, view, code_page = self.pages.map_shared_with_code(_anchor(self.tracee.pid), "pyprobes-returns",
                                                                    layout.size)
        except (SlotMapError, OSError) as e:
            self.unavailable = f"no room for the return probes' area: {e}"
            return self.unavailable
        self.overhead_ticks = _measured_overhead(self.ns_per_tick)
        self.area, self.code, self.view = area, code_page, view
        self.fixed_ns_per_tick = sx.ns_per_tick_fixed(self.ns_per_tick)
        view[:sx.HEADER.size] = sx.shadow_header(layout, self.trampoline, self.fixed_ns_per_tick,
                                                 self.overhead_ticks)
        # SHADOW_CODE_BOUND (x86/shadow_code.py) keeps each within its half of the page
        self.memory.write(code_page, sx.shadow_entry_routine(code_page, area, layout))
        self.memory.write(self.trampoline, sx.return_trampoline(self.trampoline, area, layout))
        return ""

    def add(self, target: "Target", action: str, maxactive: int) -> InProcessReturnProbe:
        """A return probe at TARGET doing ACTION in the process where it can, else stop-based."""
        if action not in ACTIONS:
            raise ProbeError(f"unknown return probe action {action!r}: " + ", ".join(map(repr, ACTIONS)))
        if target.symbol is None or target.offset != 0:
            raise ProbeError(f"a return probe goes on a function's entry, not {target.name}")
        if maxactive < 1:
            raise ProbeError("maxactive must be at least 1")
        returns = self.returns
        returns.ensure_trampoline()  # the stop-based path (before optimisation, fallback), the unwinder probe
        rp = InProcessReturnProbe(returns, target, action, maxactive)
        rp._inprocess = self
        rp.reason, page = self._page_for(target, maxactive)
        if rp.reason:
            rp.entry_probe = returns.place_entry(rp)
        else:
            rp.shadow_id = self._claim_page(rp, page)
            offset = self.layout.probe_offset(rp.shadow_id)
            page = sx.probe_page(sx.RECORD_RETURN, return_record_id=self._ring_id(rp)) \
                if action == "record" else sx.probe_page()
            self.view[offset:offset + len(page)] = page
            rp.entry_probe = returns.place_entry(rp, action="return")
            self._by_entry[rp.entry_probe] = rp
        returns.probes.append(rp)
        return rp

    def _page_for(self, target: "Target", maxactive: int) -> tuple[str, int]:
        """("", the probe page) for a return probe at TARGET followed in the process, or (why
        not, -1)."""
        if maxactive != self.layout.depth:
            return f"maxactive {maxactive}: the in-process shadow stacks are {self.layout.depth} deep", -1
        reason = self._ensure()
        if reason:
            return reason, -1
        if any(rp.address == target.address and not rp.removed for rp in self.probes):
            return "another in-process return probe is on this function (both are followed with stops)", -1
        page = self._free_page()
        if page is None:
            return f"all {self.layout.probes} in-process return probe pages are in use", -1
        return "", page

    def _free_page(self) -> int | None:
        """A probe page for a new probe: the next never used, else a removed probe's that no frame
        of any thread names any more (none can again: its trampoline is gone)."""
        if len(self.probes) < self.layout.probes:
            return len(self.probes)
        named = {f.probe_id for frames in sx.thread_frames(self.view, self.layout).values() for f in frames}
        return next((i for i, old in enumerate(self.probes) if old.removed and i not in named), None)

    def _claim_page(self, rp: InProcessReturnProbe, index: int) -> int:
        """Page INDEX (from _free_page()) for RP: a removed probe there keeps its last
        statistics, and the page and its latency sums in every thread entry start from zero."""
        if index == len(self.probes):
            self.probes.append(rp)
            return index
        self.sync()
        old = self.probes[index]
        old._page_buckets, old._inprocess = list(self.buckets(old)), None
        self.probes[index] = rp
        start = self.layout.probe_offset(index)
        self.view[start:start + sx.PAGE] = bytes(sx.PAGE)
        for entry in sx.claimed_entries(self.view, self.layout).values():
            _WORD.pack_into(self.view, self.layout.thread_offset(entry) + self.layout.sums_offset + 8 * index, 0)
        return index

    def _ring_id(self, probe: Any) -> int:
        """PROBE's id in the ring the routines append records to (made now if need be)."""
        routine = self.ring.ensure(self.area)
        _WORD.pack_into(self.view, sx.HEADER_RECORD_ROUTINE, routine)
        self.ring.returns = self
        return self.ring.probe_id(probe)

    def record_entries(self, probe: "Probe", recorder: "Probe | None") -> None:
        """The entry routine appends an entry record of RECORDER (a record probe sharing the
        trampoline of PROBE, a return probe's entry) at each call it follows; None: none. A call
        not followed (the depth or the thread table exhausted) has no entry record."""
        page = self.layout.probe_offset(self._by_entry[probe].shadow_id)
        flags = _WORD.unpack_from(self.view, page + sx.PROBE_FLAGS_OFFSET)[0] & ~sx.RECORD_ENTRY
        entry_id = 0 if recorder is None else self._ring_id(recorder)
        # word by word: the words around them are the code's, counted as the program runs
        _WORD.pack_into(self.view, page + sx.PROBE_ENTRY_ID_OFFSET, entry_id)
        _WORD.pack_into(self.view, page + sx.PROBE_FLAGS_OFFSET, flags | (sx.RECORD_ENTRY if recorder else 0))

    def breakpoint_handler(self, probe: "Probe") -> Callable[[int, Any], None]:
        """The entry probe's pre-handler while it is a breakpoint: the stop-based entry."""
        def entry(tid: int, regs: Any) -> None:
            rp = self._by_entry.get(probe)
            if rp is not None:
                self.returns.on_entry(rp, tid, regs)
        return entry

    def shadow_id(self, probe: "Probe") -> int:
        """The shadow probe id of the return probe whose entry probe is PROBE."""
        return self._by_entry[probe].shadow_id

    # ------------------------------------------------------------------ reading
    def sync(self) -> None:
        """Add what each probe page counted since the last sync to its probe (no system call)."""
        if self.view is None:
            return
        sums = sx.probe_sums(self.view, self.layout)  # one pass over the thread table for all
        for rp in self.probes:
            stats = sx.probe_stats(self.view, self.layout, rp.shadow_id, sums)[:5]
            old = rp._stats
            rp.hits += stats[0] - old[0]
            rp.missed += stats[1] - old[1]
            rp.dropped += stats[2] - old[2]
            rp._stats = stats

    def buckets(self, rp: InProcessReturnProbe) -> tuple[int, ...] | None:
        if self.view is None or rp.shadow_id is None or rp._inprocess is not self:
            return None
        return sx.probe_buckets(self.view, self.layout, rp.shadow_id)

    def return_record(self, tsc: int, tid: int, probe: Any, args: tuple[int, ...],
                      to_ns: Callable[[int], int]) -> ReturnRecord:
        """A return record of the ring (args: rax, entry TSC, rdi, rsi, rdx, rcx) decoded, its
        latency as the return trampoline bins it."""
        latency = sx.latency_ns(tsc - args[1], self.overhead_ticks, self.fixed_ns_per_tick)
        return ReturnRecord(to_ns(tsc), tid, probe, args[0], latency, tuple(args[2:]))

    # ------------------------------------------------------------------ thread entries
    def _index(self, key: int) -> int | None:
        """KEY's table entry, found as the routines find it (keys are never cleared)."""
        return sx.find_thread(self.view, self.layout, key) if self.view is not None and key else None

    def frames(self, key: int) -> list[sx.Frame]:
        """The frames of the thread whose TCB is KEY, outermost first."""
        index = self._index(key)
        return [] if index is None else sx.entry_frames(self.view, self.layout, index)

    def _empty(self, index: int, memory: Memory | None, dropped: bool) -> None:
        """Drop every frame of table entry INDEX (its thread stopped or gone), writing each real
        return address back into the stack in MEMORY first (None: the stack is gone); DROPPED:
        count each in its probe's ``dropped``."""
        for frame in sx.entry_frames(self.view, self.layout, index):
            if memory is not None:
                self._write_back(memory, frame)
            if dropped and frame.probe_id < len(self.probes):
                self.probes[frame.probe_id].dropped += 1
        _WORD.pack_into(self.view, self.layout.thread_offset(index) + sx.THREAD_DEPTH, 0)

    def _write_back(self, memory: Memory, frame: sx.Frame) -> None:
        if frame.ret == self.trampoline:
            return  # a chained frame: the outer one on this slot holds the real caller
        try:
            if memory.read_u64(frame.slot) == self.trampoline:
                memory.write_u64(frame.slot, frame.ret)
        except OSError:
            pass  # the stack is gone

    def _key(self, tid: int) -> int:
        try:
            return self.tracee.get_regs(tid, self._regs).fs_base
        except OSError:
            return self.tracee.thread_pointers.get(tid, 0)

    # ------------------------------------------------------------------ giving frames back
    def real_return_address(self, tid: int, slot: int, value: int) -> int:
        if not self.code or value != self.trampoline:
            return value
        for frame in self.frames(self._key(tid)):
            if frame.slot == slot and frame.ret != self.trampoline:
                return frame.ret
        return value

    def restore_thread(self, key: int) -> None:
        """A C++ throw in the thread whose TCB is KEY (stopped at the unwinder's entry)."""
        index = self._index(key)
        if index is not None:
            self._empty(index, self.memory, dropped=True)

    def vfork(self, tid: int, done: bool) -> None:
        """Thread TID vforks (its child runs in its memory on its TLS, so on its shadow stack):
        its entry's frames are kept before the child runs (not DONE) and given back once the
        child has exec'd or exited. The child's calls may have pushed frames, or dropped the
        parent's as dead (its stack above theirs): its drops are not counted, its frames that
        never returned (it exec'd or exited inside a call) are."""
        if self.view is None:
            return
        key = self._key(tid)
        if not done:
            self._vforks[tid] = self.frames(key)
            return
        kept = self._vforks.pop(tid, [])
        index = self._index(key)
        if index is None:
            return
        now = sx.entry_frames(self.view, self.layout, index)
        common = _common_prefix(kept, now)
        for frame, change in [(f, -1) for f in kept[common:]] + [(f, 1) for f in now[common:]]:
            if frame.probe_id < len(self.probes):
                self.probes[frame.probe_id].dropped += change
        at = self.layout.thread_offset(index)
        for i, frame in enumerate(kept):
            sx.FRAME.pack_into(self.view, at + sx.THREAD_HEADER + i * sx.FRAME_SIZE,
                               frame.ret, frame.slot, frame.tsc, frame.probe_id, *frame.args)
        _WORD.pack_into(self.view, at + sx.THREAD_DEPTH, len(kept))

    def thread_exited(self, tid: int) -> None:
        """TID is gone: its entry emptied, unless a new thread already runs with its TCB (once
        the exiting thread was let go past its exit stop, glibc may give a new thread its TCB
        before we reap it): the entry is the new thread's then, whose routine drops the dead
        frames by stack pointer as it goes."""
        pointers = self.tracee.thread_pointers
        key = pointers.get(tid, 0)
        index = self._index(key)
        if index is not None and not any(pointers.get(other) == key for other in self.tracee.threads
                                         if other != tid):
            self._empty(index, None, dropped=True)

    def restore_forked_child(self, memory: Memory, parent_tid: int) -> None:
        """The child of PARENT_TID's fork copied its hijacked slots: the real callers, in its
        memory only (its table is ours: MAP_SHARED)."""
        if self.view is None:
            return
        for frame in self.frames(self._key(parent_tid)):
            self._write_back(memory, frame)

    def restore_all(self) -> None:
        """Detach (every thread frozen and out of the code page): every frame returns to its
        real caller later."""
        if self.view is None:
            return
        self.sync()
        for index in sx.claimed_entries(self.view, self.layout).values():
            self._empty(index, self.memory, dropped=False)

    def forget(self) -> None:
        """After exec (or at release): the area is gone from the tracee; the last statistics stay."""
        if self.view is not None:
            self.sync()
            for rp in self.probes:
                rp._page_buckets = self.buckets(rp) or rp._page_buckets
                rp._inprocess = None
            self.view.close()
        for rp in self.probes:
            rp.removed = True
        self.view = None
        self.area = self.code = 0
        self.unavailable = ""
        self.probes.clear()
        self._by_entry.clear()

    def release(self) -> None:
        """Detach, after restore_all: unmap the area and the code page."""
        area, code = self.area, self.code
        self.forget()
        if area and self.tracee.alive:
            try:
                self.pages.unmap_page(code)
                self.pages.unmap_page(area, self.layout.size)
            except OSError:
                pass


_overhead: list[int] = []  # measured once per tracer


def _measured_overhead(ns_per_tick: float) -> int:
    """The trampolines' constant cost in TSC ticks, subtracted from every latency: the least
    latency the same code reports for an empty function run in the tracer (native.py)."""
    if not _overhead:
        try:
            _overhead.append(measure_overhead_ticks())
        except OSError:  # no executable memory for us: nothing subtracted
            _overhead.append(0)
    return _overhead[0]


def _common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
