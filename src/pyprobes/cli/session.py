"""What `trace` and `count` share: start or attach, place probes, run until done, leave cleanly.

Spawned commands are started stopped at their exec; pyprobes runs them to their ELF entry point
(AT_ENTRY: the dynamic loader has mapped every library the program links by then) before placing
the user's probes, so `libc:puts` resolves in a command pyprobes starts itself.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import Callable

import pyprobes
from pyprobes import (DEFAULT_BUSY_WAIT_US, PendingProbe, Probe, ProbeError, Process, ProcessExited, PyprobesError,
                      ReturnProbe, SymbolError, Target, parse_spec)

from .output import CliError, Report, note

MAX_BLOCK = 1.0
MAX_SECONDS = 1e9  # a bound on -d/-i that time.monotonic() arithmetic can take (about 31 years)
SIGNAL_STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

PreFactory = Callable[[Target], Callable | None]


def placed_line(spec: str, probe: Probe | ReturnProbe) -> str:
    """What -v says about one placed probe."""
    entry = probe.entry_probe if isinstance(probe, ReturnProbe) else probe
    how = entry.classification + (f" ({entry.reason})" if entry.reason else "")
    if entry.mode == "optimized":
        how = f"optimized: a jmp to a trampoline, no stop per hit (as a breakpoint: {how})"
    if probe.target.ifunc is not None:
        how += f"; {probe.target.ifunc.name} is an IFUNC: this is the implementation the loader selected"
    elif probe.target.is_ifunc_resolver:
        how += "; an IFUNC not resolved yet: this is its resolver"
    return (f"{spec} -> {probe.name} at {probe.address:#x} in {probe.target.module.path}: "
            f"{entry.instruction}, {how}")


def resolver_note(spec: str, probes: list[Probe | ReturnProbe]) -> str | None:
    """A line for the IFUNCs among PROBES that were placed on their resolvers (which run once,
    when the loader binds them), or None."""
    names = [p.name for p in probes if p.target.is_ifunc_resolver]
    if not names:
        return None
    if len(names) == 1 and len(probes) == 1:
        return f"{spec} is an IFUNC and is not resolved yet: probing its resolver"
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{spec}: {len(names)} IFUNCs are not resolved yet ({shown}): probing their resolvers"


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def add_speed_options(parser) -> None:
    """--same-cpu and --busy-wait, for the commands that trace."""
    parser.add_argument("--same-cpu", action="store_true",
                        help="run pyprobes and the traced threads on one CPU: cheaper stops for a program "
                             "with one busy thread, a bottleneck for one that needs its cores")
    parser.add_argument("--busy-wait", type=float, metavar="US",
                        help="after resuming a thread, poll this long for its next stop before sleeping "
                             f"(default {DEFAULT_BUSY_WAIT_US:g}, 0 with --same-cpu; 0: never poll, least CPU)")


class Session:
    """One traced process for one CLI command."""

    def __init__(self, pid: int | None, command: list[str], report: Report, verbose: bool = False,
                 same_cpu: bool = False, busy_wait_us: float | None = None) -> None:
        if busy_wait_us is not None and not 0 <= busy_wait_us < 1e9:  # also refuses nan and inf
            raise CliError("--busy-wait must be 0 or more microseconds", 2)
        if pid is not None and command:
            raise CliError("give either -p PID or a command after --, not both", 2)
        if pid is None and not command:
            raise CliError("nothing to trace: give -p PID, or a command after -- (see --help)", 2)
        self.pid_arg = pid
        self.command = command
        self.report = report
        self.verbose = verbose
        self.same_cpu = same_cpu
        self.busy_wait_us = busy_wait_us
        self.proc: Process | None = None
        self.pendings: list[PendingProbe] = []  # one per PROBE given, in order
        self.stop_signal: int | None = None
        self.start = time.monotonic()
        self.end: float | None = None
        self.started = False  # go() was called: the command runs with its probes
        self._old_handlers: dict[int, object] = {}
        self.child_status: int | None = None  # subprocess-style: negative for a killing signal

    @property
    def spawned(self) -> bool:
        return bool(self.command)

    @property
    def probes(self) -> list[Probe | ReturnProbe]:
        """Every probe placed so far (for each PROBE, in every module and image it was armed in)."""
        return [p for pp in self.pendings for p in pp.history]

    # ------------------------------------------------------------------ starting
    @staticmethod
    def check_specs(specs: list[str]) -> None:
        """Syntax errors and unsupported forms, before anything is started or attached."""
        for spec in specs:
            try:
                parsed = parse_spec(spec)
            except SymbolError as e:
                raise CliError(str(e), 2) from None

    def open(self) -> Process:
        try:
            if self.spawned:
                self.proc = pyprobes.spawn(self.command)
            else:
                self.proc = pyprobes.attach(self.pid_arg)
        except PyprobesError as e:
            raise CliError(str(e), 1) from None
        except OSError as e:
            raise CliError(f"cannot trace: {e.strerror or e}", 1) from None
        if self.verbose:
            what = " ".join(self.command) if self.spawned else f"PID {self.pid_arg}"
            note(f"{'started' if self.spawned else 'attached to'} {what} (PID {self.proc.pid})")
        if self.spawned:
            try:
                self.proc.run_to_entry()
            except ProcessExited as e:
                raise CliError(f"{self.command[0]} exited before its entry point (status {e.exit_code})", 1) from None
        if self.same_cpu:
            cpu = self.proc.share_cpu()
            if self.verbose:
                note(f"pyprobes and PID {self.proc.pid} share CPU {cpu} until detach")
        if self.busy_wait_us is not None:
            self.proc.busy_wait_us = self.busy_wait_us
        return self.proc

    # ------------------------------------------------------------------ probes
    def place(self, specs: list[str], pre_for: PreFactory | None = None,
              ret_for: PreFactory | None = None, action: str | None = None,
              return_action: str | None = None) -> list[PendingProbe]:
        """Place every probe while every thread is frozen; run() thaws them.

        Frozen, no thread can hit a probe placed a moment ago while a later one is being placed
        (a slot page mapped by a syscall injected in a thread, for instance): all the probes go
        in at once, as far as the program can tell.

        A PROBE whose module is not loaded yet is pending: placed the moment the dynamic loader
        maps it (dlopen). Every PROBE follows the program: dropped with a dlclosed library,
        placed again when it comes back, and in the new program after an exec. PRE_FOR(target)
        gives an entry probe's handler, RET_FOR(target) a return probe's (None: just count).
        ACTION "count": entry probes only count, jump-optimised where they can be. RETURN_ACTION
        ("count", "hist", "record"): return probes without a handler (RET_FOR(target) None) follow
        their calls inside the process where their entry can be jump-optimised.
        """
        proc = self.proc
        try:
            proc.pause()
        except PyprobesError as e:
            raise CliError(str(e), 1) from None
        pending = proc.pending_probes
        pending.on_change = self._on_change
        for spec in specs:
            try:
                parsed = parse_spec(spec)
            except SymbolError as e:
                raise CliError(str(e), 2) from None
            try:
                pp = pending.add(spec, kind="return" if parsed.is_return else "entry", many=True,
                                 pre_for=pre_for, handler_for=ret_for, skip_refused=parsed.is_glob,
                                 action=return_action if parsed.is_return else action)
            except ProbeError as e:
                raise CliError(str(e), 2) from None
            except ProcessLookupError:
                raise CliError(f"process {proc.pid} is gone", 1) from None
            except PyprobesError as e:
                raise CliError(str(e), 1) from None
            self.pendings.append(pp)
            if pp.state == "pending":
                note(f"{spec}: module {parsed.module!r} is not loaded yet; the probe is pending "
                     "until the program loads it")
                continue
            if (line := resolver_note(spec, pp.probes)) is not None:
                note(line)
            self._note_skipped(pp)
        try:
            proc.optimize()  # in the placement's freeze: the clock starts with the jumps in place
        except ProcessExited:
            pass  # run() reports how it ended
        if self.verbose:  # after the optimizer: each line says how the probe runs
            for pp in self.pendings:
                for probe in pp.probes:
                    note(placed_line(pp.spec, probe))
                if len(pp.probes) > 1:
                    note(f"{pp.spec}: {len(pp.probes)} probes placed")
        return self.pendings

    def _note_skipped(self, pp: PendingProbe, already: int = 0) -> None:
        skipped = pp.skipped[already:]
        if not skipped:
            return
        note(f"{pp.spec}: {len(skipped)} matching functions cannot be probed and were left out"
             + ("" if self.verbose else " (-v lists them)"))
        if self.verbose:
            for name, why in skipped:
                note(f"  {name}: {why}")

    def _on_change(self, what: str, pp: PendingProbe | None, detail: str) -> None:
        """The loader or an exec changed what is probed (called from inside the event loop)."""
        self.report.flush()
        if what == "exec":
            note(f"process {self.proc.pid} executed {detail}: probes are placed again where they "
                 "resolve in the new program")
        elif what == "missing":
            if self.verbose:
                note(f"{pp.spec}: not placed in the new program: {detail}")
        elif what == "failed":
            note(f"{pp.spec}: {detail}" if pp is not None else detail)
        elif what == "armed":
            probe = next((p for p in reversed(pp.history) if p.name == detail), None)
            if self.verbose:
                note(placed_line(pp.spec, probe) if probe is not None else f"{pp.spec} -> {detail}")
            if probe is not None and (line := resolver_note(f"{pp.spec} ({probe.name})", [probe])) is not None:
                note(line)
        elif what == "skipped":
            note(f"{pp.spec}: {detail}" + ("" if self.verbose else " (-v lists them)"))
            if self.verbose:
                for name, why in pp.skipped[-int(detail.split()[0]):]:
                    note(f"  {name}: {why}")
        elif what == "unloaded" and self.verbose:
            note(f"{pp.spec}: {detail} was unloaded; its probes were dropped")

    # ------------------------------------------------------------------ running
    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum
        if self.proc is not None and self.proc.alive:
            self.proc.stop()

    def install_signals(self) -> None:
        # A signal ignored when pyprobes starts (SIGINT for a background job, SIGHUP under nohup)
        # stays ignored, as shells leave it: for pyprobes, and so for the command it starts,
        # which inherits the ignore across exec (a handler would be reset to the default).
        for sig in SIGNAL_STOPS:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def restore_signals(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()

    def go(self) -> None:
        """The probes are in: start the clock and let the held thread(s) run."""
        self.started = True
        self.start = time.monotonic()

    def run(self, duration: float | None = None, interval: float | None = None,
            tick: Callable[[], None] | None = None) -> None:
        """Run until the process exits, a stop signal, or DURATION; call TICK every INTERVAL."""
        proc = self.proc
        deadline = None if duration is None else self.start + duration
        next_tick = None if interval is None else self.start + interval
        while self.stop_signal is None:
            now = time.monotonic()
            waits = [t - now for t in (deadline, next_tick) if t is not None]
            # Never block for long: a stop signal landing just before run() starts is seen here.
            timeout = max(min(waits + [MAX_BLOCK]), 0.0)
            try:
                code = proc.run(timeout)
            except PyprobesError as e:
                raise CliError(str(e), 1) from None
            except OSError as e:  # a ptrace call failed under the engine: report it, then detach
                raise CliError(f"lost control of process {proc.pid}: {e}", 1) from None
            if code is not None or not proc.alive:
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if next_tick is not None and now >= next_tick:
                next_tick += interval * (1 + int((now - next_tick) // interval))
                if tick is not None:
                    tick()
        self.end = time.monotonic()

    @property
    def duration(self) -> float:
        return (self.end if self.end is not None else time.monotonic()) - self.start

    def close(self) -> None:
        """Detach (text restored, slots gone); for a spawned command, wait for it and keep its status."""
        proc = self.proc
        if proc is None:
            return
        if self.spawned and not self.started:
            # Probes could not be placed: the command has not run a line of its own code; it
            # must not run at all.
            try:
                proc.kill()
            except (PyprobesError, OSError):
                pass
            self.child_status = None
            return
        # A stop signal sent to pyprobes alone (SIGTERM, SIGHUP, `kill -INT`) is passed on to the
        # command; a terminal's Ctrl-C reaches the whole process group, the command included, and
        # is not sent twice. Asked before detach, while every signal the command got is seen.
        forward = False
        if self.stop_signal is not None and self.spawned and proc.alive:
            try:
                proc.pause()  # every stop collected: was_sent() is exact
                forward = not proc.was_sent(self.stop_signal)
            except PyprobesError:
                pass  # it exited meanwhile: nothing to pass on
        try:
            proc.detach()
        except PyprobesError as e:
            note(f"while detaching: {e}")
        for pp in self.pendings:
            if not pp.history:
                note(f"{pp.spec}: module {pp.module!r} was never loaded: nothing was probed")
        if self.end is None:
            self.end = time.monotonic()
        if not self.spawned:
            return
        if not proc.alive:
            self.child_status = proc.exit_code
            return
        if forward:
            try:
                os.kill(proc.pid, self.stop_signal)
            except ProcessLookupError:
                pass
        # The command has its stop signal now: it decides, we wait for it.
        while True:
            try:
                _, status = os.waitpid(proc.pid, 0)
                break
            except ChildProcessError:
                status = None
                break
            except InterruptedError:
                continue
        if status is None:
            self.child_status = proc.exit_code
        elif os.WIFSIGNALED(status):
            self.child_status = -os.WTERMSIG(status)
        else:
            self.child_status = os.WEXITSTATUS(status)

    def exit_status(self) -> int:
        """pyprobes' own exit status: the command's (128+N for a killing signal), else 0."""
        if not self.spawned:
            return 0
        code = self.child_status
        if code is None:
            note(f"could not learn how {self.command[0]} ended")
            return 1
        if code < 0:
            note(f"{self.command[0]} was killed by signal {-code} ({signal_name(-code)})")
            return 128 - code
        return code
