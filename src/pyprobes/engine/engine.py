"""The probe engine: placing probes, the hit path (docs/ARCHITECTURE.md), signals, migration out of slots.

The hit path (thread trapped on the breakpoint at A, its program counter just past it):
  pre-handlers (regs with the program counter = A), then
  emulated insn -> apply its effect, resume                         (1 stop)
  boosted slot  -> PC = slot, continue; the slot jumps back            (1 stop)
  stepped slot  -> PC = slot, single-step; on the step trap:
                   the arch fix-up (SlotCopy.resume_after_step in x86/arch.py: the program
                   counter, a pushed return address or flags), post-handlers, resume (2 stops);
                   as in the seed, a clean step with no post-handler makes the point boosted.

Like kernel/kprobes.c this file is generic: registers and instruction bytes are the business of
x86/ (classify, compile_emulation, prepare_slot, SlotCopy), register access goes through the
tracee. Probes, return probes, pending probes and the slot host see the engine only through
the Protocols they declare (ProbeOwner, ProbePlacer, PendingHost, SlotMigrator).
"""
from __future__ import annotations

import sys
from typing import Callable, Iterable

from ..slots import SlotCache
from ..symbols import Module, Spec, SymbolError, Target, modules, resolve
from ..tracee import Event, EventKind, Regs, Tracee, is_fault
from ..tracee.procfs import has_memory
from ..x86 import (MAX_INSTRUCTION_LENGTH, Kind, MidInstructionError, RelocationError, classify,
                   compile_emulation, instruction_at, instruction_pointer, prepare_slot,
                   set_instruction_pointer)
from .ifunc import follow_ifuncs
from .loader import LoaderEvents
from .optimizer import Optimizer
from .probe import Handler, Probe, ProbeError, ProbePoint, check_action
from .rescue import Rescue
from .retprobe import ReturnProbes
from .slothost import TraceeSlotHost
from .usdt import Semaphores

UNSIZED_FUNCTION_BYTES = 256


class Engine:
    def __init__(self, tracee: Tracee) -> None:
        self.tracee = tracee
        self.memory = tracee.memory
        self.points: dict[int, ProbePoint] = {}
        self.probes: list[Probe] = []
        self.host = TraceeSlotHost(tracee, self)
        self.slots = SlotCache(self.host)
        self.rescue = Rescue(tracee, self.host)  # the program survives our death (engine/rescue.py)
        self.optimizer = Optimizer(self, tracee, self.host)  # jump-optimised points (issue 11)
        self.semaphores = Semaphores(tracee.memory)  # USDT semaphores our probes hold (usdt.py)
        self.stats = {"threads_migrated": 0, "signals_held": 0, "faults_in_slots": 0}
        self._stepping: dict[int, ProbePoint] = {}  # tid -> the point whose slot it is single-stepping
        self._slot_origin: dict[int, ProbePoint] = {}  # slot address -> the point whose copy it holds
        self._regs = Regs()
        # The tracee's register calls, bound once for the hit path.
        self._get_pc = tracee.get_rip
        self._set_pc = tracee.set_rip
        self._get_regs = tracee.get_regs
        self._set_regs = tracee.set_regs
        self._live_regs = tracee.live_regs
        self.handler_errors: list[tuple[Probe, BaseException]] = []
        self.on_handler_error: Callable[[Probe, BaseException], None] | None = None
        self.loader = LoaderEvents(self, tracee)
        self.returns = ReturnProbes(self, tracee, self.host, self.loader, self.optimizer.ring)
        tracee.breakpoint_handler = self.on_breakpoint
        tracee.step_handler = self.on_step
        tracee.fork_hooks.append(self.returns.restore_forked_child)
        tracee.fork_hooks.append(self.semaphores.restore_forked_child)
        # Called with no arguments at the end of on_exec, before the exec'ing thread resumes:
        # the new image's loader has not run a line yet (pending probes re-arm from there).
        self.exec_hooks: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ placing
    def targets(self, spec: str | int | Spec, mods: list[Module] | None = None) -> list[Target]:
        """Where a probe at SPEC goes: resolve()'s targets, an IFUNC at the implementation the
        loader selected for it (ifunc.py). MODS reuses a snapshot of the process's modules."""
        try:
            if mods is None:
                mods = modules(self.tracee.pid)
            found = resolve(self.tracee.pid, spec, mods)
        except SymbolError as e:
            raise ProbeError(str(e)) from None
        return follow_ifuncs(found, mods, self.memory.read_u64)

    def add_probe(self, target: Target, pre: Handler | None = None, post: Handler | None = None,
                  boost: bool = True, action: str | None = None) -> Probe:
        """ACTION "count": the probe only counts, and may be jump-optimised (optimizer.py);
        "record": it also appends a record per hit to the ring (ring.py) when optimised."""
        point = self.points.get(target.address)
        check_action(target, point, action, pre, post)
        if point is None:
            if self.optimizer.optimized:
                self.optimizer.clear_for(target.address)
            point = self._new_point(target)
        probe = Probe(self, point, target, target.spec, pre, post, boost, action)
        probe.semaphore = self.semaphores.hold_for(target)  # a USDT probe's, its site accepted
        if action in ("record", "return"):  # while (or where) a breakpoint: the tracer does the action
            probe.pre = self.optimizer.breakpoint_handler(probe)
        point.probes.append(probe)
        self.probes.append(probe)
        self.update_point(point)
        return probe

    def function_code(self, start: int, size: int) -> bytes:
        """SIZE bytes of code at START as loaded: our int3 bytes and patches read as the originals."""
        data = self.memory.read(start, size)
        return self.tracee.breakpoints.restore_view(start, data)

    def _new_point(self, target: Target) -> ProbePoint:
        address = target.address
        if target.symbol is None:
            raise ProbeError(f"{address:#x} is in no known function, so its instruction boundaries "
                             "cannot be checked")
        size = target.symbol.size or UNSIZED_FUNCTION_BYTES
        code = self.function_code(target.symbol_address, max(size, target.offset + MAX_INSTRUCTION_LENGTH + 1))
        try:
            insn = instruction_at(code, target.symbol_address, address)
        except MidInstructionError as e:
            raise ProbeError(f"cannot probe {target.name}: {e}") from None
        point = self._point_for(address, insn, target.name)
        point.function, point.module = (target.symbol_address, target.symbol.size), target.module
        return point

    def _point_for(self, address: int, insn, name: str) -> ProbePoint:
        verdict = classify(insn)
        if verdict.kind is Kind.REFUSE:
            raise ProbeError(f"cannot probe {name} ({insn.text}): {verdict.reason}")
        point = ProbePoint(address, insn, verdict.kind, verdict.reason, name)
        if verdict.kind is Kind.EMULATE:
            point.emulation = compile_emulation(insn)
        else:
            self._give_slot(point)
        self.points[address] = point
        return point

    def _give_slot(self, point: ProbePoint) -> None:
        slot = self.slots.get(point.address)
        try:
            copy = prepare_slot(point.insn, slot.address, boosted=not point.step_only, jmp_back=True)
        except RelocationError as e:
            self.slots.free(slot, dirty=False)
            raise ProbeError(f"cannot probe {point.name}: {e}") from None
        self.memory.write(slot.address, copy.bytes)
        point.slot, point.copy = slot, copy
        self._slot_origin[slot.address] = point

    def update_point(self, point: ProbePoint) -> None:
        """Arm or disarm after a change: the breakpoint is there exactly while an enabled probe wants
        it and the point is not jump-optimised (then queued for the optimizer)."""
        optimizer = self.optimizer
        optimizer.sync_point(point)  # what was counted so far goes to the probes it counted for
        point.refresh()
        if optimizer.still_serves(point):
            return
        optimizer.unoptimize(point)  # armed under its freeze; queued again if still wanted
        optimizer.queue(point)
        self.set_armed(point)

    def set_armed(self, point: ProbePoint) -> None:
        """The int3 at POINT exactly while an enabled probe wants it and no jmp is there."""
        want = bool(point.counting or point.pre or point.post) and not point.removed and point.optimized is None
        if want and not point.armed:
            self.rescue.arm(point)
            self.tracee.breakpoints.insert(point.address)
            point.armed = True
        elif not want and point.armed:
            self.tracee.breakpoints.remove(point.address)
            point.armed = False
            self.rescue.disarm(point)

    def remove_probe(self, probe: Probe) -> None:
        probe.removed = True
        probe.enabled = False
        if probe.semaphore is not None:
            self.semaphores.release(probe.semaphore)
        point = probe.point
        point.probes.remove(probe)
        if probe in self.probes:
            self.probes.remove(probe)
        if point.probes:
            self.update_point(point)
            return
        point.removed = True
        self.update_point(point)
        del self.points[point.address]
        self._release_slot(point)

    def drop_probes_in(self, inside: Callable[[int], bool]) -> int:
        """Every probe and return probe at an address INSIDE accepts leaves the engine with
        nothing written back (its library was unmapped: whatever is there now is not ours).
        Returns how many probes went."""
        dropped = 0
        self.semaphores.forget_in(inside)
        for point in [p for p in self.points.values() if inside(p.address)]:
            self.optimizer.abandon(point)
            if point.armed:
                self.tracee.breakpoints.abandon(point.address)
                point.armed = False
                self.rescue.disarm(point)
            point.removed = True  # never armed again while its probes go, one by one
            for probe in list(point.probes):
                probe.remove()
                dropped += 1
        for rp in [r for r in self.returns.probes if inside(r.address)]:
            rp.remove()
        return dropped

    def _release_slot(self, point: ProbePoint) -> None:
        # A thread single-stepping the copy is inside the slot until its trap is seen: the free
        # waits for the last one (on_step), so a clean free is never reused under a stepper.
        if point.slot is None or point.steppers:
            return
        slot, point.slot = point.slot, None
        if self.tracee.alive:
            self.slots.free(slot, dirty=point.dirty)

    # ------------------------------------------------------------------ the hit path
    def handle(self, event: Event) -> None:
        kind = event.kind
        if kind is EventKind.BREAKPOINT:
            self.on_breakpoint(event.tid, event.address)
        elif kind is EventKind.SINGLESTEP:
            self.on_step(event.tid)
        elif kind is EventKind.SIGNAL:
            self.on_signal(event)
        elif kind is EventKind.EXEC:
            self.on_exec()
            self.tracee.resume(event.tid)
        elif kind is EventKind.THREAD_EXIT:
            self.returns.thread_exited(event.tid)
            point = self._stepping.pop(event.tid, None)
            if point is not None:
                self._step_done(point)
        elif event.needs_resume:
            self.tracee.handle_default(event)

    def on_breakpoint(self, tid: int, address: int) -> None:
        point = self.points.get(address)
        tracee = self.tracee
        if point is None or not point.armed:
            if address == self.returns.trampoline:
                self.returns.on_trampoline(tid)
                tracee.resume(tid)
                return
            # Removed after this thread trapped on it: run the original instruction instead.
            self._set_pc(tid, address)
            tracee.resume(tid)
            return
        for probe in point.tally:
            probe.hits += 1
        emulation = point.emulation
        if emulation is not None and not point.pre and not emulation.needs_memory:
            # An emulation that reads and writes a register or two: touch just those.
            if emulation.constant_rip is not None:
                self._set_pc(tid, emulation.constant_rip)
            else:
                emulation.apply(self._live_regs(tid), None)
            tracee.resume(tid)
            return
        if point.pre or emulation is not None:
            regs = self._get_regs(tid, self._regs)
            set_instruction_pointer(regs, address)
            if point.pre:
                before = bytes(regs)
                self._call_handlers(point.pre, "pre", tid, regs)
                if instruction_pointer(regs) != address or not point.armed:
                    # The handler moved execution elsewhere (the instruction is skipped: kprobes'
                    # pre_handler returning 1), or removed or disabled the last probe here, which
                    # put the original instruction back in place: run it there.
                    self._set_regs(tid, regs)
                    tracee.resume(tid)
                    return
                changed = bytes(regs) != before
            else:
                changed = False
            if point.emulation is not None:
                point.emulation.apply(regs, self.memory)
                self._set_regs(tid, regs)
                tracee.resume(tid)
                return
            if changed:
                set_instruction_pointer(regs, point.slot.address)
                self._set_regs(tid, regs)
            else:
                self._set_pc(tid, point.slot.address)
        else:
            self._set_pc(tid, point.slot.address)
        if point.boosted and not tracee.threads[tid].held_signals:
            point.dirty = True
            tracee.resume(tid)
        else:
            # Stepped, and also a boosted point's hit by a thread owed a held signal: resuming
            # at this (signal) stop would deliver that signal with the thread in the slot (invariant
            # 2); the step's trap delivers it, back in original code.
            point.steppers += 1
            self._stepping[tid] = point
            tracee.resume(tid, step=True)

    def _call_handlers(self, probes: Iterable[Probe], which: str, tid: int, regs: Regs) -> None:
        for probe in probes:
            try:
                getattr(probe, which)(tid, regs)
            except Exception as e:  # a handler's bug must not take the traced program down
                probe.missed += 1
                probe.last_error = e
                self.handler_errors.append((probe, e))
                if self.on_handler_error is not None:
                    self.on_handler_error(probe, e)
            else:
                if which == "pre":
                    probe.hits += 1

    def on_step(self, tid: int) -> None:
        point = self._stepping.pop(tid, None)
        if point is None:
            self.tracee.resume(tid)
            return
        copy = point.copy
        pc = self._get_pc(tid)
        if pc == copy.slot_address:
            # Still at the copy's start: it has not finished (a rep string instruction between
            # iterations): step on.
            self._stepping[tid] = point
            self.tracee.resume(tid, step=True)
            return
        copy.resume_after_step(self.tracee, self.memory, tid, pc)
        if point.post:
            regs = self._get_regs(tid, self._regs)
            before = bytes(regs)
            self._call_handlers(point.post, "post", tid, regs)
            if bytes(regs) != before:
                self._set_regs(tid, regs)
        self._step_done(point)
        if point.may_boost and not point.boosted and not point.removed:
            point.boosted = True
        self.tracee.resume(tid)

    def _step_done(self, point: ProbePoint) -> None:
        """A thread single-stepping POINT's copy is out of the slot (its step ran, it faulted, it
        was migrated, or it exited): a removed point's slot is given back after the last one."""
        point.steppers -= 1
        if point.removed:
            self._release_slot(point)

    def on_signal(self, event: Event) -> None:
        tid, sig = event.tid, event.signal
        pc = self._get_pc(tid)
        stepping = self._stepping.get(tid)
        if stepping is None and not self.slots.contains(pc):
            if self.optimizer.contains(pc):
                self.optimizer.on_signal(event, pc, self.stats)
                return
            self.tracee.resume(tid, sig)
            return
        # The thread is inside a slot: no signal may be delivered there (invariant 2).
        slot = self.slots.slot_at(pc)
        owner = self._slot_origin.get(slot.address) if slot is not None else stepping
        if owner is not None and slot is not None and pc == slot.address and is_fault(event):
            # The copied instruction faulted: report it at the original address, as if it had
            # executed in place (kprobes' fault handler does the same).
            self.stats["faults_in_slots"] += 1
            if stepping is not None:
                self._stepping.pop(tid)
                self._step_done(stepping)
            self._set_pc(tid, owner.address)
            self.tracee.resume(tid, sig)
            return
        self.stats["signals_held"] += 1  # resuming it with a step holds the signal (Tracee.resume)
        if event.siginfo is None:
            event.siginfo = self.tracee.get_siginfo(tid)
        if stepping is not None:
            self.tracee.resume(tid, step=True)  # the step's trap resumes it with the held signal
        else:
            self.migrate_out_of_slot(tid)
            if self.tracee.threads[tid].event_pending is event:
                # Moved out with no step (the program counter set straight back from the jmp):
                # nothing held the signal, and it is still this stop's own to deliver, now in
                # original code.
                self.tracee.resume(tid, sig)
            else:
                self.tracee.resume(tid)  # the migration's step held the signal: this delivers it

    def in_slot(self, address: int) -> bool:
        """Whether ADDRESS lies in an instruction slot or a trampoline (SlotMigrator, for the slot host)."""
        return self.slots.contains(address) or self.optimizer.contains(address)

    def in_slot_of(self, point: ProbePoint, address: int, tid: int) -> bool:
        """Whether thread TID, at ADDRESS, is in POINT's instruction slot (or stepping it)."""
        slot = self.slots.slot_at(address)
        return self._stepping.get(tid) is point or (slot is not None and slot == point.slot)

    def sync_counters(self) -> None:
        """Add what the jump-optimised points counted in the tracee to their probes' hits."""
        self.optimizer.sync()  # from our view of the counters: after an exit or exec too

    def migrate_out_of_slot(self, tid: int) -> None:
        """Step a stopped thread until its program counter is back in original code."""
        tracee = self.tracee
        migrated = self.optimizer.migrate(tid)
        pc = self._get_pc(tid)
        while self.slots.contains(pc):
            slot = self.slots.slot_at(pc)
            point = self._slot_origin[slot.address]
            copy = point.copy
            stepping = self._stepping.get(tid)
            if pc == slot.address:
                # The copy has not run. If it faults (its stop came in a freeze, or comes from
                # this step) the fault is reported at the original address, as on_signal does,
                # instead of stepping the copy into it again and again.
                pending = tracee.threads[tid].event_pending
                faulted = pending is not None and is_fault(pending)
                if not faulted:
                    faulted = is_fault(tracee.step(tid))  # the step holds it for the next resume
                if faulted:
                    self.stats["faults_in_slots"] += 1
                    self._set_pc(tid, point.address)
                    pc = point.address
                else:
                    pc = self._get_pc(tid)
                    if pc == slot.address:
                        continue
                    pc = copy.resume_after_step(tracee, self.memory, tid, pc)
            elif stepping is point:
                pc = copy.resume_after_step(tracee, self.memory, tid, pc)  # its step ran; the trap is queued
            else:
                new = copy.original_address(pc)
                if new == pc:
                    tracee.step(tid)  # somewhere unexpected in the slot: let the code itself lead out
                    pc = self._get_pc(tid)
                    continue
                self._set_pc(tid, new)
                pc = new
            if stepping is point:
                self._stepping.pop(tid)
                self._step_done(point)
            migrated = True
        if migrated:
            self.stats["threads_migrated"] += 1

    def on_exec(self) -> None:
        """The image is gone, and with it every breakpoint, slot and probe placed in it."""
        for probe in self.probes:
            probe.removed = True
            probe.enabled = False
        for point in self.points.values():
            point.removed = True
            point.armed = False
            point.slot = None
        self.points.clear()
        self.probes.clear()
        self._stepping.clear()
        self._slot_origin.clear()
        self.slots = SlotCache(self.host)
        self.optimizer.forget()
        self.semaphores.forget()
        self.loader.forget()
        self.returns.forget()
        self.rescue.forget()
        for hook in self.exec_hooks:
            hook()

    # ------------------------------------------------------------------ leaving
    def detach(self) -> None:
        """Every breakpoint removed, every thread out of the slots, pages unmapped, threads detached."""
        tracee = self.tracee
        if not tracee.attached:
            return
        if tracee.alive:
            try:
                for point in list(self.points.values()):
                    if point.armed:
                        tracee.breakpoints.remove(point.address)
                        point.armed = False
                snapshot = tracee.freeze()
                self.optimizer.unoptimize_all()  # synced, bytes back, nobody in an action
                for tid, regs in snapshot.regs.items():
                    if self.in_slot(instruction_pointer(regs)) or tid in self._stepping:
                        self.migrate_out_of_slot(tid)
                    pending = tracee.threads[tid].event_pending
                    if pending is not None and pending.kind is EventKind.BREAKPOINT \
                            and pending.address == self.returns.trampoline:
                        self.returns.on_trampoline(tid)
                self._stepping.clear()
                self.returns.restore_all()
                self.semaphores.release_all()
                self.slots.release_all()
                self.optimizer.release()
                self.returns.release()
                self.rescue.release()
            except Exception as e:  # the process died under us: nothing left to restore
                if tracee.alive and has_memory(tracee.pid):
                    print(f"pyprobes: while detaching: {e}", file=sys.stderr)
        for probe in self.probes:
            probe.removed = True
            probe.enabled = False
        self.points.clear()
        tracee.detach()
