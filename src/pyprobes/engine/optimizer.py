"""Jump-optimised probes (issue 11): the kernel's optprobes optimizer, generic (x86 in x86/optimize.py).

A probe point every probe of which only counts (action="count") is placed as an int3 first,
as any other, and queued. At the start of the next Process.run() one freeze serves every
queued point, as the kernel's delayed kprobe_optimizer batches its work. For each point:

  find_region      whole instructions of at least 5 bytes from the probe, decoded from the
                   function's start, and no branch or RIP-relative address anywhere in the
                   module reaching past their first byte (refused: the point stays a
                   breakpoint, and Probe.not_optimized says why);
  quiet?           a thread in (region.start, region.end) is moved to the same point of the
                   relocated copy, one in the point's instruction slot is migrated out, and
                   no stack word (a return address, a signal frame's RIP) may point in that
                   range; else the point waits for the next run();
  install          the count trampoline in a slot of the trampoline cache (the kernel's
                   kprobe_optinsn_slots: a second SlotCache, 64-byte slots), its counter in the
                   rw- page mapped beside that trampoline page (a memfd we map too), the int3 removed (a late trap on
                   it is rewound as retired) and the jmp written (invariant 6: every thread frozen).

Hits are counted in the tracee: sync() adds each counter's growth to the hits of the point's
enabled probes (a record point's counter counts its drops: its records drained since, the rest). Unoptimising restores the bytes with every thread frozen, steps a thread out of
the trampoline's action (so its hit is counted before the last sync) and frees the trampoline
dirty: it is garbage until a collection's freeze has moved every thread out of it (invariant 1).
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..slots import PAGE_SIZE, Slot, SlotCache, SlotMapError
from ..tracee import Event, EventKind, Snapshot, ThreadState, Tracee, is_fault
from ..x86 import (TRAMPOLINE_SLOT_SIZE, MidInstructionError, Refusal, Region, RelocationError,
                   Trampoline, count_trampoline, find_region, jump_patch,
                   stack_pointer, stack_words)
from ..x86.action import flags_saved_by_lahf
from ..x86.record import PROBE_ID_OFFSET, record_action_trampoline, routine_trampoline
from .probe import ProbePoint
from .ring import Ring
from .sweep import ModuleSweep
from .trampolines import _COUNTER, COUNTER_SIZE, TrampolineHost

if TYPE_CHECKING:
    from .engine import Engine
    from .probe import Probe
    from .slothost import TraceeSlotHost

STACK_SCAN = 16 << 10  # bytes above RSP searched for addresses inside a region before patching


@dataclass
class Optimized:
    """An optimised point's patch: its region, trampoline (in SLOT), counter and what sync() saw;
    a record point's probe id (its counter counts drops, its records the other hits)."""

    region: Region
    trampoline: Trampoline
    slot: Slot
    counter: int
    synced: int = 0
    record_id: int | None = None
    actions: frozenset = frozenset()  # of the probes it was made for: another set needs another one
    counting: tuple = ()  # the probes its counter's hits go to (a removed one's last ones too)


class Optimizer:
    """Queues, optimises, counts and unoptimises the jump-optimised points of one engine."""

    def __init__(self, engine: "Engine", tracee: Tracee, host: "TraceeSlotHost") -> None:
        self.engine = engine
        self.tracee = tracee
        self.memory = tracee.memory
        self._host = host
        self.host = TrampolineHost(host)
        self.cache = SlotCache(self.host, slot_size=TRAMPOLINE_SLOT_SIZE)
        self.waiting: dict[int, ProbePoint] = {}    # address -> point queued for the next run()
        self.optimized: dict[int, ProbePoint] = {}  # address -> optimised point
        self._live: dict[int, ProbePoint] = {}      # trampoline address -> the point it serves
        self._trampolines: dict[int, Trampoline] = {}  # trampoline address -> code (garbage too)
        self.stats = {"optimized": 0, "unoptimized": 0, "retries": 0}
        self.ring = Ring(host, tracee)  # the record action's ring and routine (ring.py)
        self._sweeps: dict[str, ModuleSweep] = {}  # module path -> what its code reaches

    # ------------------------------------------------------------------ queue
    @staticmethod
    def wants(point: ProbePoint) -> bool:
        if not (point.may_optimize and point.counting and not point.removed):
            return False
        opt = point.optimized
        return opt is None or opt.actions == _actions(point)

    def still_serves(self, point: ProbePoint) -> bool:
        """After POINT's probes changed: whether its trampoline still does what they want (the
        hits it counts are theirs from now on). If not, unoptimize() credits its last hits to
        the probes it counted for until then."""
        opt = point.optimized
        if opt is None or not self.wants(point):
            return False
        opt.counting = point.counting
        return True

    def queue(self, point: ProbePoint) -> None:
        if point.optimized is None and not point.not_optimized and self.wants(point):
            self.waiting[point.address] = point

    def contains(self, address: int) -> bool:
        """Whether ADDRESS is in a trampoline page, the record routine or the in-process return
        probes' code (their entry routine and return trampoline)."""
        return self.cache.contains(address) or self._in_routine(address)

    def _in_routine(self, address: int) -> bool:
        """Whether ADDRESS is in shared code a trampoline calls (or a return lands on)."""
        return self.ring.contains(address) or self.engine.returns.inprocess.contains(address)

    def breakpoint_handler(self, probe: "Probe") -> Callable[[int, Any], None]:
        """The pre-handler of PROBE (action "record" or "return") while its point is a breakpoint."""
        if probe.action == "return":
            return self.engine.returns.inprocess.breakpoint_handler(probe)
        return self.ring.breakpoint_handler(probe)

    def _refuse(self, point: ProbePoint, reason: str) -> None:
        point.not_optimized = reason
        self.waiting.pop(point.address, None)

    # ------------------------------------------------------------------ optimising
    def optimize_waiting(self) -> int:
        """Optimise every queued point that can be, under one freeze; return how many were."""
        if not self.waiting or not self.tracee.alive:
            return 0
        ready = []
        addresses = sorted(self.engine.points)
        for point in list(self.waiting.values()):
            if not self.wants(point):
                self.waiting.pop(point.address)
                continue
            prepared = self._prepare(point, addresses)
            if prepared is not None:
                ready.append((point, *prepared))
        if not ready:
            return 0
        done = 0
        unused: list[Slot] = []
        snapshot = self.tracee.freeze()
        try:
            self.ring.learn(snapshot)
            stacks = {tid: stack_words(self._stack(stack_pointer(regs)))
                      for tid, regs in snapshot.regs.items()}
            for point, region, slot, trampoline, counter in ready:
                moves = self._quiet(point, region, trampoline, snapshot, stacks)
                if moves is not None:
                    self._install(point, region, slot, trampoline, counter, moves)
                    done += 1
                else:
                    self.stats["retries"] += 1
                    unused.append(slot)
        finally:
            self.tracee.thaw()
            for slot in unused:
                self.cache.free(slot, dirty=False)  # never ran: free at once
        return done

    def _prepare(self, point: ProbePoint,
                 addresses: list[int]) -> tuple[Region, Slot, Trampoline, int] | None:
        start, size = point.function
        try:
            code = self.engine.function_code(start, size) if size > 0 else b""
            # switch tables read from the process: absolute entries as relocated
            region = find_region(code, start, size, point.address, self.memory.read)
        except (MidInstructionError, ValueError, OSError) as e:
            self._refuse(point, str(e))
            return None
        if isinstance(region, Refusal):
            self._refuse(point, region.reason)
            return None
        if not flags_saved_by_lahf():
            self._refuse(point, "this CPU has no lahf/sahf in 64-bit mode, which the "
                         "trampoline's action saves the flags with")
            return None
        source = self._branch_into(point, region)
        if source is not None:
            self._refuse(point, f"{source} reaches into the bytes {region.start:#x}..{region.end:#x} "
                         "a jmp would replace")
            return None
        at = bisect_right(addresses, region.probe_address)
        if at < len(addresses) and addresses[at] < region.end:
            self._refuse(point, f"another probe at {addresses[at]:#x} lies in the bytes "
                         f"{region.start:#x}..{region.end:#x} a jmp would replace")
            return None
        try:
            slot = self.cache.get(region.start)
        except SlotMapError as e:
            self._refuse(point, str(e))
            return None
        counter = self.host.counter(slot)
        try:
            if _actions(point) & {"record", "return"}:
                trampoline = self._calling_trampoline(point, region, slot, counter)
            else:
                trampoline = count_trampoline(region, slot.address, counter)
            if len(trampoline.code) > self.cache.slot_size:
                raise RelocationError(f"its trampoline takes {len(trampoline.code)} bytes, more "
                                      f"than a {self.cache.slot_size}-byte slot")
        except (RelocationError, SlotMapError) as e:
            self.cache.free(slot, dirty=False)
            self._refuse(point, str(e))
            return None
        return region, slot, trampoline, counter

    def _calling_trampoline(self, point: ProbePoint, region: Region, slot: Slot,
                            counter: int) -> Trampoline:
        """The record and return actions' trampoline: a call to a shared routine through a word of
        its counter page (the ring's action routine's the last, the in-process return probes'
        entry routine's the one before: both kinds share pages). The record action routine finds
        its probe id PROBE_ID_OFFSET past the counter; the entry routine gets it in r11 (and
        appends the entry records of a record probe beside the return probe's entry)."""
        returner = _first(point, "return")
        recorder = _first(point, "record")
        view, counters = self.host.views[slot.page], self.host.counters[slot.page]
        if returner is None:
            self.ring.ensure(region.start)
            _COUNTER.pack_into(view, PAGE_SIZE - COUNTER_SIZE, self.ring.action_routine)
            _COUNTER.pack_into(view, slot.index * COUNTER_SIZE + PROBE_ID_OFFSET, self.ring.probe_id(recorder))
            return record_action_trampoline(region, slot.address, counter, counters + PAGE_SIZE - COUNTER_SIZE)
        returns = self.engine.returns.inprocess
        returns.record_entries(returner, recorder)
        pointer = PAGE_SIZE - 2 * COUNTER_SIZE
        _COUNTER.pack_into(view, pointer, returns.entry_routine)
        return routine_trampoline(region, slot.address, counter, counters + pointer, returns.shadow_id(returner))

    def _branch_into(self, point: ProbePoint, region: Region) -> str | None:
        """What in the point's module (any function: hand-written code jumps into others, a
        .cold part back into its function, a switch table's entry) branches to or takes an address in the region past
        its first byte; None if nothing does. One sweep per module, cached."""
        module = point.module
        if module is None:
            return "code of an unknown module"
        sweep = self._sweeps.get(module.path)
        if sweep is None or sweep.elf is not module.elf:
            sweep = self._sweeps[module.path] = ModuleSweep(module.elf)
        reached = sweep.reached_inside(module.to_link(region.start), module.to_link(region.end))
        if reached is not None:
            return f"a branch or address in {module.name} (to {module.to_runtime(reached):#x})"
        return None

    def _quiet(self, point: ProbePoint, region: Region, trampoline: Trampoline,
               snapshot: Snapshot, stacks: dict[int, list[int]]) -> dict[int, int] | None:
        """With every thread frozen: the threads inside the region past its start, each with
        the same point of the relocated copy to move it to; None when a thread cannot be moved
        there (it has a stop of its own to handle or a signal held) or a stack word points into the region (a
        return address, a signal frame's RIP): retry at the next run(). A thread in the point's
        instruction slot is migrated out first."""
        engine, tracee = self.engine, self.tracee
        lo, hi = region.start, region.end
        relocated = {original: here for here, original in trampoline.relocated}
        moves: dict[int, int] = {}
        for tid, regs in snapshot.regs.items():
            thread = tracee.threads.get(tid)
            if thread is None or thread.exiting:
                continue
            rip = tracee.get_rip(tid)
            pending = thread.event_pending
            if pending is not None and pending.kind is EventKind.BREAKPOINT \
                    and pending.address == point.address:
                rip = point.address  # trapped on the int3: rewound to the jmp once it is retired
            elif engine.in_slot_of(point, rip, tid):
                engine.migrate_out_of_slot(tid)
                rip = tracee.get_rip(tid)
            if lo < rip < hi:
                # A signal held from it (a step out of the slot just now) would be delivered as
                # it resumes: in the trampoline, if it were moved there.
                if thread.event_pending is not None or thread.held_signals or rip not in relocated:
                    return None
                moves[tid] = relocated[rip]
            words = stacks[tid]
            at = bisect_right(words, lo)
            if at < len(words) and words[at] < hi:
                return None
        return moves

    def _stack(self, sp: int) -> bytes:
        """Up to STACK_SCAN bytes from SP: as far as the mapping goes."""
        first = PAGE_SIZE - sp % PAGE_SIZE
        try:
            data = self.memory.read(sp, first)
        except OSError:
            return b""
        while len(data) < STACK_SCAN:
            try:
                data += self.memory.read(sp + len(data), PAGE_SIZE)
            except OSError:
                break
        return data[:STACK_SCAN]

    def _install(self, point: ProbePoint, region: Region, slot: Slot, trampoline: Trampoline,
                 counter: int, moves: dict[int, int]) -> None:
        breakpoints = self.tracee.breakpoints
        self.host.reset(slot)
        self.memory.write(slot.address, trampoline.code)
        for tid, rip in moves.items():  # its hit was counted as it passed the probe
            self.tracee.set_rip(tid, rip)
        if point.armed:
            breakpoints.remove(point.address)
            point.armed = False
            self.engine.rescue.disarm(point)  # no int3 left here for a dead tracer's rescue to undo
        breakpoints.patch(region.start, jump_patch(region, slot.address))
        actions = _actions(point)
        # A record trampoline's counter counts its drops, its records the rest; a return probe's
        # entry trampoline counts every call, for every probe of the point.
        record_id = self.ring.probe_id(_first(point, "record")) if actions == {"record"} else None
        point.optimized = Optimized(region, trampoline, slot, counter, record_id=record_id, actions=actions,
                                    counting=point.counting)
        self.optimized[point.address] = point
        self._live[slot.address] = point
        self._trampolines[slot.address] = trampoline
        self.waiting.pop(point.address, None)
        self.stats["optimized"] += 1

    # ------------------------------------------------------------------ counting
    def sync_point(self, point: ProbePoint) -> None:
        """Add what POINT's counter grew by since the last sync to the hits of the probes it counts for."""
        opt = point.optimized
        if opt is None:
            return
        value = self.host.read(opt.slot)
        delta, opt.synced = value - opt.synced, value
        if opt.record_id is not None:  # the counter holds its drops: its records are the rest
            self.ring.drain()
            delta += self.ring.recorded.pop(opt.record_id, 0)
        if delta:
            for probe in opt.counting:
                probe.hits += delta

    def sync(self) -> None:
        """sync_point() for every optimised point (from our view of the counters: no syscall),
        the ring drained first (a record point's hits are its records drained)."""
        self.ring.drain()
        for point in self.optimized.values():
            self.sync_point(point)
        self.engine.returns.inprocess.sync()

    # ------------------------------------------------------------------ unoptimising
    def unoptimize(self, point: ProbePoint) -> None:
        """Put the original bytes back and the int3 over them if a probe still wants the point,
        under one freeze (no thread runs the bare original between the jmp and the int3), count
        the hits of threads inside the trampoline's action, and free the trampoline dirty."""
        opt = point.optimized
        if opt is None:
            return
        own_freeze = not self.tracee.frozen
        if own_freeze:
            self.tracee.freeze()
        try:
            self._restore(point)
            self.engine.set_armed(point)
        finally:
            if own_freeze:
                self.tracee.thaw()
        if own_freeze:  # a collection it may trigger freezes on its own
            self.cache.free(opt.slot, dirty=True)

    def _restore(self, point: ProbePoint) -> None:
        opt = point.optimized
        self.tracee.breakpoints.unpatch(opt.region.start)
        trampoline = opt.trampoline
        self._live.pop(trampoline.address, None)  # the original bytes are back: map, not step
        for tid in self._stopped_tids():
            # In a routine a trampoline calls (the record routine, an in-process return probe's
            # entry routine), it may have come from this trampoline: its return address is here
            # (and its hit neither a committed record nor a counted drop yet).
            rip = self.tracee.get_rip(tid)
            if trampoline.address <= rip < trampoline.end or self._in_routine(rip):
                self.migrate(tid)
        self.sync_point(point)
        point.optimized = None
        self.optimized.pop(point.address, None)
        self.stats["unoptimized"] += 1

    def _stopped_tids(self) -> list[int]:
        return [t.tid for t in self.tracee.threads.values()
                if t.state is ThreadState.STOPPED and not t.exiting]

    def unoptimize_all(self) -> None:
        """Detach: every patch restored, with the caller's freeze; pages go with release()."""
        for point in list(self.optimized.values()):
            self._restore(point)

    def clear_for(self, address: int) -> None:
        """A new probe point at ADDRESS: unoptimise a point whose patched bytes hold it."""
        for point in list(self.optimized.values()):
            opt = point.optimized
            if point.address < address < opt.region.end:
                self.unoptimize(point)

    def abandon(self, point: ProbePoint) -> None:
        """POINT's library is unmapped: forget its patch without writing; its trampoline is garbage."""
        opt = point.optimized
        if opt is None:
            return
        self.tracee.breakpoints.abandon_patch(opt.region.start)
        self.sync_point(point)
        point.optimized = None
        self.optimized.pop(point.address, None)
        self._live.pop(opt.slot.address, None)
        self.cache.free(opt.slot, dirty=True)

    # ------------------------------------------------------------------ migration
    def migrate(self, tid: int) -> bool:
        """Move a stopped thread out of the trampolines. The action is single-stepped out (the
        hit counted, the red zone and flags given back) and through the first relocated
        instruction (the probed one); further in the relocated part, a trampoline whose patch is
        gone maps RIP to the original instruction, a live one is stepped out through its jmp back
        (the original bytes past region.start are the jmp's)."""
        tracee = self.tracee
        pc = tracee.get_rip(tid)
        moved = False
        while self.cache.contains(pc) or self._in_routine(pc):
            moved = True
            if self._in_routine(pc):  # a routine returns to its trampoline's action, a return
                # trampoline to the real caller
                event = tracee.step(tid)  # they hold no pushfq/popfq: a step leaves no TF behind
                if is_fault(event):  # the routine's own fault (the return trampoline's ud2): there
                    return True
                pc = tracee.get_rip(tid)
                continue
            slot = self.cache.slot_at(pc)
            trampoline = self._trampolines.get(slot.address)
            live = self._live.get(slot.address) is not None
            new = None if trampoline is None else trampoline.original_address(pc)
            if trampoline is not None and trampoline.finish_action(tracee, self.memory, tid, pc):
                pc = tracee.get_rip(tid)
                continue
            # The first relocated instruction is the probed one, whose hit the action counted: it
            # runs here, never again under the point's int3 (back at once if still wanted).
            counted = trampoline is not None and pc == trampoline.address + trampoline.relocated_offset
            if trampoline is None or trampoline.in_action(pc) or live or new is None or counted:
                event = tracee.step(tid)
                if trampoline is not None:
                    trampoline.after_step(tracee, self.memory, tid, pc)
                if is_fault(event) and new is not None:
                    tracee.set_rip(tid, new)  # a relocated instruction faulted: report it in place
                    return True
                pc = tracee.get_rip(tid)
                continue
            tracee.set_rip(tid, new)
            pc = new
        return moved

    def on_signal(self, event: Event, pc: int, stats: dict[str, int]) -> None:
        """A signal for a thread at PC in a trampoline, as in a slot (invariant 2): a fault of a
        relocated instruction is reported at its original address; any other signal waits
        until the thread is out of the trampoline."""
        tracee, tid, sig = self.tracee, event.tid, event.signal
        slot = self.cache.slot_at(pc)
        trampoline = self._trampolines.get(slot.address) if slot is not None else None
        original = None if trampoline is None else trampoline.original_address(pc)
        if original is not None and is_fault(event):
            stats["faults_in_slots"] += 1
            tracee.set_rip(tid, original)
            tracee.resume(tid, sig)
            return
        stats["signals_held"] += 1
        if event.siginfo is None:
            event.siginfo = tracee.get_siginfo(tid)
        self.migrate(tid)  # a step holds the signal for the resume below; none: it is still ours
        tracee.resume(tid, sig if tracee.threads[tid].event_pending is event else 0)

    # ------------------------------------------------------------------ exec and detach
    def forget(self) -> None:
        """After exec: nothing of ours is left in the new image. The old image's last counts are
        in our view of its counters: they are synced first."""
        self.sync()
        for point in self.optimized.values():
            point.optimized = None
        self.ring.forget()
        self.host.forget()
        self.cache = SlotCache(self.host, slot_size=TRAMPOLINE_SLOT_SIZE)
        self.waiting.clear()
        self.optimized.clear()
        self._live.clear()
        self._trampolines.clear()

    def release(self) -> None:
        """Detach, after unoptimize_all and migration: unmap every trampoline and counter page."""
        self.cache.release_all()
        self.ring.release()


def _actions(point: ProbePoint) -> frozenset:
    """The actions of POINT's enabled probes: what its trampoline does."""
    return frozenset(p.action for p in point.counting)


def _first(point: ProbePoint, action: str) -> "Probe | None":
    return next((p for p in point.counting if p.action == action), None)
