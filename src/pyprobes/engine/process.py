"""The Python API: a traced process with probes on it.

    with pyprobes.spawn(["./prog", "arg"]) as proc:     # or pyprobes.attach(pid)
        p = proc.probe("hit", pre=on_hit)
        proc.run()
        p.hits, p.missed, p.mode
"""
from __future__ import annotations

import os
import signal as _signal
import threading
import time
from typing import Sequence

from ..errors import PyprobesError
from ..slots import SlotCache
from ..symbols import AT_ENTRY, FunctionInfo, Symbol, Target, TypeInfo, auxv_value, debug_info_for, modules, symbolize
from ..tracee import DEFAULT_BUSY_WAIT_NS, EventKind, ProcessExited, Tracee
from ..tracee.procfs import pending_signals, thread_name
from .args import read_arguments, typed_value
from .engine import Engine
from .loader import RT_CONSISTENT
from .pending import PendingProbe, PendingProbes
from .probe import Handler, Probe, ProbeError
from .ring import Record, ReturnRecord
from .retprobe import DEFAULT_MAXACTIVE, EntryHandler, ReturnHandler, ReturnProbe
from .stack import MAX_DEPTH, Frame, Unwinder
from .typed_args import parse_types, typed_args


DEFAULT_BUSY_WAIT_US = DEFAULT_BUSY_WAIT_NS / 1000


class Process:
    """A process under pyprobes' control (spawned stopped before its first instruction, or attached)."""

    def __init__(self, tracee: Tracee) -> None:
        self.tracee = tracee
        self.engine = Engine(tracee)
        self._stop_requested = False
        self._pending: PendingProbes | None = None
        self._affinity: dict[int, set[int]] | None = None  # share_cpu(): what to give back at detach
        self._unwinder: Unwinder | None = None

    @property
    def pid(self) -> int:
        return self.tracee.pid

    @property
    def exit_code(self) -> int | None:
        return self.tracee.exit_code

    @property
    def alive(self) -> bool:
        return self.tracee.alive

    @property
    def slots(self) -> SlotCache:
        return self.engine.slots

    @property
    def trampolines(self) -> SlotCache:
        """The jump-optimised probes' trampoline cache (64-byte slots): its stats() show pages,
        garbage and collections."""
        return self.engine.optimizer.cache

    @property
    def probes(self) -> list[Probe]:
        return list(self.engine.probes)

    @property
    def pending_probes(self) -> PendingProbes:
        """The pending probes and the watch on the dynamic loader (started by the first one)."""
        if self._pending is None:
            self._pending = PendingProbes(self.engine)
        return self._pending

    def probe(self, spec: str | int, pre: Handler | None = None, post: Handler | None = None,
              boost: bool = True, pending: bool = False, action: str | None = None) -> Probe | PendingProbe:
        """One probe at SPEC ([MODULE:]SYMBOL[+OFFSET], MODULE:0xADDR, or a runtime address).

        action="record": as "count", and once optimised each hit also appends a Record (time,
        thread, probe, argument registers) to a ring in shared memory: see records().

        action="count": the probe only counts (no handlers). It goes in as a breakpoint; at the
        next run() it is jump-optimised where it can be (mode "optimized": counted inside the
        process, no stop per hit), and stays a breakpoint elsewhere (Probe.not_optimized says
        why). Its hits are brought up to date when run() returns (sync_counters()).

        pending=True: a PendingProbe, placed at once if SPEC's module is loaded, else the moment
        the dynamic loader maps it (dlopen); dropped if the library is unloaded, placed again if
        it comes back, and placed in the new program after an exec."""
        _check_probe_action(action)
        if pending:
            return self.pending_probes.add(spec, pre=pre, post=post, boost=boost, action=action)
        targets = self.engine.targets(spec)
        if len(targets) != 1:
            names = ", ".join(t.name for t in targets[:5])
            raise ProbeError(f"{spec!r} matches {len(targets)} functions ({names}...): use probe_all()")
        return self.engine.add_probe(targets[0], pre=pre, post=post, boost=boost, action=action)

    def probe_all(self, spec: str | int, pre: Handler | None = None, post: Handler | None = None,
                  boost: bool = True, pending: bool = False,
                  action: str | None = None) -> list[Probe] | PendingProbe:
        """A probe at every function SPEC matches (globs: 'libc:str*'); pending=True: one
        PendingProbe holding them, matched again in each module as it is loaded."""
        _check_probe_action(action)
        if pending:
            return self.pending_probes.add(spec, many=True, pre=pre, post=post, boost=boost,
                                           action=action)
        return [self.engine.add_probe(t, pre=pre, post=post, boost=boost, action=action)
                for t in self.engine.targets(spec)]

    def return_probe(self, spec: str | int, handler: "ReturnHandler | None" = None,
                     entry: "EntryHandler | None" = None, maxactive: int = DEFAULT_MAXACTIVE,
                     pending: bool = False, action: str | None = None) -> ReturnProbe | PendingProbe:
        """A probe on the return of the function at SPEC: handler(tid, retval, elapsed_ns, data),
        where data is what entry(tid, regs) returned at the call. At most MAXACTIVE calls per
        thread are followed at once; deeper ones count as missed. pending=True: as for probe().

        action="count", "hist" or "record" (no handlers): the calls are followed inside the
        process with no stop once the entry is jump-optimised at the next run() (mode
        "optimized"; else the stop-based way, not_optimized says why). Its hits, missed and
        dropped are brought up to date when run() returns; .histogram gives the latencies
        ("hist" and "record"; overhead subtracted); "record" also puts a ReturnRecord(time_ns,
        tid, probe, retval, latency_ns, args) per return into records()."""
        if action is not None and (handler is not None or entry is not None):
            raise ProbeError(f"a return probe with action={action!r} has no handlers")
        if pending:
            return self.pending_probes.add(spec, kind="return", handler=handler, entry=entry,
                                           maxactive=maxactive, action=action)
        return self.engine.returns.add(self._one_function(spec), handler, entry=entry, maxactive=maxactive,
                                       action=action)

    def _one_function(self, spec: str | int) -> Target:
        if isinstance(spec, str) and spec.endswith("%return"):
            spec = spec[: -len("%return")]
        targets = self.engine.targets(spec)
        if len(targets) != 1:
            raise ProbeError(f"{spec!r} matches {len(targets)} functions: a return probe needs exactly one")
        return targets[0]

    def args(self, target: Target, tid: int, regs, types: "tuple[str, ...] | None" = None) -> list:
        """A hit's arguments at TARGET as typed values, for a handler given (TID, REGS): a USDT
        probe's from its note, a function's from the ABI's registers (as many as TYPES names;
        TYPES defaults to the type list TARGET's spec ends in). See Probe.args."""
        if types is None:
            types = parse_types(target.spec)
        return typed_args(target, types, tid, regs, self.engine.memory, self.tracee.get_xmm)

    def pause(self) -> None:
        """Stop every thread until the next run(). Probes placed meanwhile go in at once, as far
        as the program can tell: no thread hits one placed a moment ago while the next one is
        still being placed (with a slot page mapped by a system call injected in a thread, say)."""
        self.tracee.freeze()

    def optimize(self) -> int:
        """Jump-optimise now every probe waiting for it (run() does it at its start anyway), under
        one freeze, or under the pause's while paused; return how many were."""
        return self.engine.optimizer.optimize_waiting()

    def run_to_entry(self) -> None:
        """Run a process spawned stopped at its exec until the dynamic loader has mapped and
        relocated every library it links, and pause it there, before any of their code runs:
        at the loader's startup RT_CONSISTENT event (its r_brk, where gdb stops too: library
        constructors have not run yet), or at the ELF entry point (AT_ENTRY) for a program
        without one. `libc:puts` then resolves before the program has run a line of its own.
        Raises PyprobesError if the program exits first."""
        tracee = self.tracee
        if not tracee.alive:
            raise ProcessExited(self.pid, self.exit_code)
        mods = modules(self.pid)
        loader = self.engine.loader
        if loader.watch(mods) and loader.r_debug is not None:
            # A probe of our own beside the loader events' hook (they share its int3): with a
            # post-handler it is stepped, so the thread is held past the hook, not in a slot.
            target = loader.hook.target

            def ready() -> bool:
                return loader.state() == RT_CONSISTENT
        else:
            entry = auxv_value(self.pid, AT_ENTRY)
            target = None if entry is None else symbolize(entry, mods)
            if target is None:
                return
            if target.symbol is None or target.offset:
                mod = target.module
                target = Target(entry, mod, Symbol("(entry)", mod.to_link(entry), 0, "global"), entry, 0,
                                f"0x{entry:x}")

            def ready() -> bool:
                return True
        arrived: list[int] = []
        arriving: set[int] = set()

        def stop_there(tid: int, regs) -> None:
            if tid in arriving:
                arriving.discard(tid)
                tracee.hold(tid)  # keep it stopped through the rest of this run
                arrived.append(tid)
                self.stop()

        def pre(tid: int, regs) -> None:
            if ready():
                arriving.add(tid)
                if probe.mode == "emulated":
                    stop_there(tid, regs)  # emulated: no step, so no post-handler

        try:
            probe = self.engine.add_probe(target, pre=pre, post=stop_there, boost=False)
        except PyprobesError:
            return  # a place we cannot probe: libraries resolve as they are at exec
        code = self.run()
        probe.remove()
        if code is not None or not self.alive:
            raise ProcessExited(self.pid, code)
        self.pause()
        for tid in arrived:
            tracee.release(tid, resume=False)  # paused now: the next run() lets it go

    def function_info(self, target: Target) -> FunctionInfo | None:
        """TARGET's function as its module's DWARF describes it (parameters, their types and
        locations at entry; the return type); None when TARGET is inside a function or the
        debug info does not describe it. Raises NoDebugInfo when the module has no debug info."""
        if target.symbol is None or target.offset:
            return None
        info = debug_info_for(getattr(target.module.elf, "path", None) or target.module.path)
        return info.function_at(target.module.to_link(target.symbol_address))

    def read_arguments(self, tid: int, regs, function: FunctionInfo) -> list:
        """FUNCTION's parameter values at a hit on its entry (inside an entry handler only):
        numbers, bools, floats, str for `char *`, addresses for other pointers, and an
        Unavailable (a str) where there is no value. See engine/args.py."""
        return read_arguments(self.tracee, tid, regs, function)

    def typed_return(self, tid: int, retval, type_: TypeInfo):
        """A return probe's RETVAL (rax, with .xmm0) as TYPE_ (a function's return_type)."""
        vector = retval.xmm0 if type_.kind == "float" else None
        return typed_value(self.tracee, type_, int(retval), vector)

    def thread_name(self, tid: int) -> str:
        """Thread TID's name: its comm while it lives, the one it had at its exit after ("" for
        a thread never seen)."""
        return thread_name(self.pid, tid) or self.tracee.thread_names.get(tid, "")

    def was_sent(self, sig: int) -> bool:
        """Whether signal SIG reached the program while traced: it stopped for it (pyprobes then
        delivers it, or holds it until the thread is out of a slot), or it is pending now.
        Exact while paused (pause()): a stop the kernel reported but pyprobes has not collected
        yet is neither pending nor counted."""
        if self.tracee.signals_reported[sig]:
            return True
        return self.alive and bool(pending_signals(self.pid) & (1 << (sig - 1)))

    def stop(self) -> None:
        """Make run() return soon; safe from a handler or a signal handler."""
        self._stop_requested = True
        if self.tracee.alive:
            self.tracee.wake()

    def run(self, timeout: float | None = None) -> int | None:
        """Handle events until the process exits (return its exit code) or TIMEOUT/stop() (return None)."""
        tracee, engine = self.tracee, self.engine
        if not tracee.alive:
            return self.exit_code
        if self._stop_requested:  # a stop() that came before run() (a signal, say) still counts
            self._stop_requested = False
            return None
        try:
            self.optimize()  # one freeze for every point waiting (optimizer.py), before the clock starts
        except ProcessExited:
            return self.exit_code
        deadline = None if timeout is None else time.monotonic() + timeout
        in_main = threading.current_thread() is threading.main_thread()
        previous = None
        if deadline is not None and in_main:
            previous = _signal.signal(_signal.SIGALRM, lambda *_: tracee.wake())
            _signal.setitimer(_signal.ITIMER_REAL, max(timeout, 0.001))
        block = deadline is None or in_main
        tracee.thaw()
        try:
            while True:
                try:
                    event = tracee.wait(block)
                except ProcessExited:
                    return self.exit_code
                if event is None:  # polling without a timer (not the main thread)
                    if time.monotonic() >= deadline:
                        return None
                    time.sleep(0.001)
                    continue
                kind = event.kind
                if kind is EventKind.PROCESS_EXIT:
                    return self.exit_code
                if kind is EventKind.WAKE:
                    if self._stop_requested or (deadline is not None and time.monotonic() >= deadline):
                        self._stop_requested = False
                        return None
                    continue
                try:
                    engine.handle(event)
                except ProcessLookupError:
                    tracee.vanished(event.tid)  # killed while its stop was handled
                if self._stop_requested:
                    self._stop_requested = False
                    return None
        finally:
            if previous is not None:
                _signal.setitimer(_signal.ITIMER_REAL, 0)
                _signal.signal(_signal.SIGALRM, previous)
            self.sync_counters()

    def records(self) -> "list[Record | ReturnRecord]":
        """The records of action="record" probes that arrived since the last call: each a
        Record(time_ns, tid, probe, args), or a ReturnRecord for a return probe's return,
        oldest first per thread. run() drains the ring
        whenever it returns; call run(timeout) in a loop so the ring does not fill."""
        return self.engine.optimizer.ring.take()

    @property
    def lost_records(self) -> int:
        """Records dropped because the ring was full (the program never waits for pyprobes)."""
        return self.engine.optimizer.ring.lost

    @property
    def ring_capacity(self) -> int:
        return self.engine.optimizer.ring.capacity

    @ring_capacity.setter
    def ring_capacity(self, records: int) -> None:
        """The ring's size in records (a power of two), before the first record probe is optimised."""
        ring = self.engine.optimizer.ring
        if ring.address:
            raise ProbeError("the record ring is made already: set ring_capacity before run()")
        if records <= 0 or records & (records - 1):
            raise ProbeError(f"ring_capacity {records} is not a power of two")
        ring.capacity = records
        ring.size = ring.size_for(records)

    def sync_counters(self) -> None:
        """Bring the hits of jump-optimised probes up to date (they are counted in the process)."""
        try:
            self.engine.sync_counters()
        except (OSError, ProcessExited):
            pass  # the process is gone: its last counts were taken at its threads' exits

    @property
    def busy_wait_us(self) -> float:
        """How long run() polls for the next stop after resuming a thread before it sleeps in
        waitpid (0: never poll). Polling saves the scheduler's wake-up of the tracer on every
        stop of a hot probe; a quiet process costs at most this much tracer CPU per stop. There
        is no polling while the process has as many threads as the tracer has CPUs, and
        share_cpu() sets this to 0 (polling would hold the CPU the traced threads need); set it
        after share_cpu() to override."""
        return self.tracee.busy_wait_ns / 1000

    @busy_wait_us.setter
    def busy_wait_us(self, us: float) -> None:
        if not 0 <= us < 1e9:  # also refuses nan and inf
            raise ValueError(f"busy_wait_us must be between 0 and 1e9 µs, not {us}")
        self.tracee.busy_wait_ns = int(us * 1000)

    def share_cpu(self, cpu: int | None = None) -> int:
        """Run the tracer and every thread of the process on one CPU (the tracer's current one by
        default); return it. A stop costs less when the tracer needs no cross-CPU wake-up (README
        "Speed" has the measurements), but the process's threads then share that CPU too: worth it for a
        single-threaded or one-hot-thread program, not for one that needs its cores. Every
        affinity is given back at detach; threads born meanwhile get the process's original one.
        """
        if cpu is None:
            cpu = os.sched_getcpu() if hasattr(os, "sched_getcpu") else min(os.sched_getaffinity(0))
        saved = self._affinity if self._affinity is not None else {0: os.sched_getaffinity(0)}
        for tid in list(self.tracee.threads):
            try:
                saved.setdefault(tid, os.sched_getaffinity(tid))
                os.sched_setaffinity(tid, {cpu})
            except OSError:
                continue  # gone meanwhile
        os.sched_setaffinity(0, {cpu})
        self._affinity = saved
        # A tracer polling on the CPU its traced thread needs only delays that thread's next stop.
        self.tracee.busy_wait_ns = 0
        return cpu

    def _restore_affinity(self) -> None:
        saved, self._affinity = self._affinity, None
        if saved is None:
            return
        tracer = saved.pop(0)
        original = saved.get(self.pid, tracer)
        for tid in list(self.tracee.threads):
            try:
                os.sched_setaffinity(tid, saved.get(tid, original))
            except OSError:
                pass
        os.sched_setaffinity(0, tracer)

    def stack(self, tid: int, regs, max_depth: int = MAX_DEPTH) -> list[Frame]:
        """The user stack of thread TID, which a pre-handler was given with REGS, innermost frame first,
        unwound with the modules' .eh_frame (engine/stack.py): call it from the handler, while
        the thread is stopped. A probe whose handler calls it must be a breakpoint (not
        action="count")."""
        if self._unwinder is None:
            self._unwinder = Unwinder(self.pid, self.tracee.memory,
                                      real_return=self.engine.returns.real_return_address,
                                      generation=lambda: self.engine.loader.reports)
            if self._forget_unwinder not in self.engine.exec_hooks:
                self.engine.exec_hooks.append(self._forget_unwinder)
        return self._unwinder.unwind(tid, regs, max_depth)

    def _forget_unwinder(self) -> None:
        self._unwinder = None  # a new image: its modules and pcs are not the old ones

    def detach(self) -> None:
        """Remove every probe and let the process run on untraced, exactly as it was."""
        if self._affinity is not None and self.tracee.alive:
            self._restore_affinity()
        self.engine.detach()
        if self._affinity is not None:
            os.sched_setaffinity(0, self._affinity[0])
            self._affinity = None

    def kill(self) -> int | None:
        code = self.tracee.kill()
        if self._affinity is not None:
            os.sched_setaffinity(0, self._affinity[0])
            self._affinity = None
        return code

    def __enter__(self) -> "Process":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def _check_probe_action(action: str | None) -> None:
    """The actions of probe() and probe_all(); "return" is an in-process return probe's entry,
    which return_probe() places with its probe page."""
    if action not in (None, "count", "record"):
        raise ProbeError(f"unknown probe action {action!r}: 'count' or 'record' "
                         "(return_probe(spec, action=...) for a return)")


def spawn(argv: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None) -> Process:
    """Start ARGV traced, stopped before its first instruction, so probes can go in before main."""
    return Process(Tracee.spawn(argv, env=env, cwd=cwd))


def attach(pid: int) -> Process:
    """Trace the running process PID (every thread)."""
    return Process(Tracee.attach(pid))
