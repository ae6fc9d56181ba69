"""Probes and probe points: what a user asked for, and the one breakpoint that serves them.

Several probes on one address share one ProbePoint (kprobes' aggregate probe): one breakpoint, one
slot, one decoded instruction, each probe with its own handlers, enable flag and counters.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

from ..errors import PyprobesError
from ..slots import Slot
from ..x86 import Emulation, Insn, Kind, SlotCopy
from .typed_args import parse_types, typed_args

if TYPE_CHECKING:
    from ..symbols import Target

Handler = Callable[[int, Any], Any]


class ProbeOwner(Protocol):
    """What a Probe asks of whoever placed it (the Engine) when it is enabled, disabled or removed."""

    def update_point(self, point: "ProbePoint") -> None: ...

    def remove_probe(self, probe: "Probe") -> None: ...

    memory: Any  # the tracee's memory (Probe.args reads strings through it)
    tracee: Any


class ProbePlacer(Protocol):
    """Placing a probe (the Engine does it): what return probes and the loader watch need."""

    def add_probe(self, target: "Target", pre: Handler | None = None, post: Handler | None = None,
                  boost: bool = True, action: str | None = None) -> "Probe": ...


class ProbeError(PyprobesError):
    """A probe cannot be placed (refused instruction, mid-instruction address, no room for a slot...)."""


class ProbePoint:
    """One probed address: the breakpoint, the displaced instruction and how it is executed."""

    __slots__ = ("address", "insn", "kind", "reason", "emulation", "slot", "copy", "boosted",
                 "dirty", "probes", "pre", "post", "counting", "armed", "steppers", "removed",
                 "name", "step_only", "tally", "may_boost", "function", "optimized",
                 "may_optimize", "not_optimized", "module")

    def __init__(self, address: int, insn: Insn, kind: Kind, reason: str, name: str) -> None:
        self.address = address
        self.insn = insn
        self.kind = kind                      # the classification: emulated / stepped / boosted
        self.reason = reason
        self.name = name
        self.emulation: Emulation | None = None
        self.slot: Slot | None = None
        self.copy: SlotCopy | None = None     # what the slot holds, and its fix-up after a step
        self.step_only = kind is Kind.STEP    # never boost this one
        self.boosted = False                  # as in the seed: boosted after a clean step, if allowed
        self.may_boost = not self.step_only   # every probe allows it and none has a post-handler
        self.dirty = False                    # the slot ran boosted: freeing it makes garbage
        self.probes: list[Probe] = []
        self.pre: tuple[Probe, ...] = ()      # enabled probes with a pre-handler (hoisted for the hit path)
        self.post: tuple[Probe, ...] = ()
        self.counting: tuple[Probe, ...] = ()  # every enabled probe: each hit counts for each
        self.tally: tuple[Probe, ...] = ()    # enabled probes with no pre-handler: counted as they trap
        self.armed = False
        self.steppers = 0                     # threads single-stepping in the slot right now
        self.removed = False
        self.function: tuple[int, int] = (address, 0)  # (start, size) of its symbol; size 0: unknown
        self.module: Any = None                # the symbols.Module it is in
        # Jump optimisation (engine/optimizer.py): the patch and trampoline when optimised; whether
        # every probe here asks for it (count-only); why it is not, when it was refused.
        self.optimized: Any = None
        self.may_optimize = False
        self.not_optimized = ""

    @property
    def mode(self) -> str:
        """What a hit here does: "optimized" (a jump to a trampoline counts it, no stop),
        "emulated", "boosted" or "stepped". A point that may be boosted
        says "boosted" from the start, though (as in the seed) it is stepped until a clean step
        shows the copy runs straight through; `boosted` says whether that has happened."""
        if self.optimized is not None:
            return "optimized"
        if self.emulation is not None:
            return "emulated"
        return "boosted" if self.may_boost else "stepped"

    def refresh(self) -> None:
        """Recompute the hoisted handler lists after a probe was added, removed, enabled or disabled."""
        enabled = [p for p in self.probes if p.enabled]
        self.counting = tuple(enabled)
        self.pre = tuple(p for p in enabled if p.pre is not None)
        self.tally = tuple(p for p in enabled if p.pre is None)
        self.post = tuple(p for p in enabled if p.post is not None)
        if not self.probes:
            return  # the last probe went: the point keeps the mode it had
        self.may_boost = all(p.boost for p in self.probes) and not self.post and not self.step_only
        # One trampoline does one action, or a return probe's entry and one more: the entry
        # routine it calls also appends the entry records, its counter counts every call.
        actions = {p.action for p in self.probes}
        self.may_optimize = actions <= {"count", "record", "return"} and len(actions - {"return"}) <= 1 \
            and sum(p.action == "return" for p in self.probes) <= 1
        if not self.may_boost:
            self.boosted = False


class Probe:
    """A user's probe. `hits` counts every execution reported to it; `missed` those its handler failed on."""

    def __init__(self, owner: ProbeOwner, point: ProbePoint, target: "Target | None", spec: str | int,
                 pre: Handler | None, post: Handler | None, boost: bool,
                 action: str | None = None) -> None:
        self._owner = owner
        self.point = point
        self.target = target
        self.spec = spec
        self.pre = pre
        self.post = post
        self.boost = boost
        # "count": the probe only counts, so its hits may be counted inside the process by a
        # jump-optimised probe (issue 11) once every probe on its address asks the same.
        self.action = action
        self.enabled = True
        self.removed = False
        self.hits = 0
        self.missed = 0
        self.last_error: BaseException | None = None
        self.semaphore: int | None = None  # the runtime USDT semaphore this probe holds raised
        self._types: tuple[str, ...] | None | bool = False  # the spec's type list, parsed on first use

    @property
    def address(self) -> int:
        return self.point.address

    @property
    def types(self) -> tuple[str, ...] | None:
        """The type list the spec ends in ("usdt:python:function__entry(str,str,int)"), or None."""
        if self._types is False:
            self._types = parse_types(self.spec)
        return self._types  # type: ignore[return-value]

    def args(self, tid: int, regs: Any) -> list[Any]:
        """The hit's arguments, for a pre handler given (TID, REGS): a USDT probe's from its note
        (converted to each one's size and sign), a function's from the ABI's registers, as
        many as the spec's type list names; each shown as its type says (str read from the
        tracee, at most STRING_LIMIT bytes, "..." when cut)."""
        return typed_args(self.target, self.types, tid, regs, self._owner.memory,
                          self._owner.tracee.get_xmm)

    def usdt_args(self, regs: Any) -> list[int]:
        """A USDT probe's arguments as the note gives them (integers of their size and sign)."""
        usdt = self.target.usdt if self.target is not None else None
        if usdt is None:
            raise ProbeError(f"{self.name} is not a USDT probe")
        return usdt.arguments(regs, self._owner.memory.read, self.target.module.load_bias)

    @property
    def name(self) -> str:
        return self.point.name

    @property
    def mode(self) -> str:
        return self.point.mode

    @property
    def classification(self) -> str:
        """What the probed instruction was classified as: "emulated", "stepped" or "boosted"
        (whatever the probes on it ask: `mode` says what a hit does)."""
        return self.point.kind.value

    @property
    def reason(self) -> str:
        """Why it was classified so ("" when nothing stands in the way of boosting)."""
        return self.point.reason

    @property
    def not_optimized(self) -> str:
        """Why a probe that asked for action="count" is not jump-optimised ("" when it is, or
        while it waits for the next run())."""
        return self.point.not_optimized

    @property
    def instruction(self) -> str:
        """The probed instruction, disassembled."""
        return self.point.insn.text

    def enable(self) -> None:
        if self.removed:
            raise ProbeError(f"probe {self.name} was removed")
        if not self.enabled:
            self.enabled = True
            self._owner.update_point(self.point)

    def disable(self) -> None:
        if self.enabled and not self.removed:
            self.enabled = False
            self._owner.update_point(self.point)

    def remove(self) -> None:
        if not self.removed:
            self._owner.remove_probe(self)

    def __repr__(self) -> str:
        state = "removed" if self.removed else ("enabled" if self.enabled else "disabled")
        return f"<Probe {self.name} at {self.address:#x} {self.mode} {state} hits={self.hits}>"


def check_action(target: Any, point: ProbePoint | None, action: str | None,
                 pre: Handler | None, post: Handler | None) -> None:
    """ProbeError unless a probe with ACTION (and PRE, POST) may go at TARGET, whose point
    (None if new) is POINT."""
    if action not in (None, "count", "record", "return"):  # "return": an in-process return probe's entry
        raise ProbeError(f"unknown probe action {action!r}: 'count' or 'record'")
    if action is not None and (pre is not None or post is not None):
        raise ProbeError(f"a probe with action={action!r} has no handlers")
    # A probe with handlers (action None) keeps the point a breakpoint, where each probe
    # does its own (a record probe records from the tracer, a return probe's entry follows the
    # call the stop-based way): they mix. Count and record could only share a trampoline that
    # does both, which there is not; a return probe's entry routine also records entries.
    actions = {action, *(p.action for p in point.probes)} if point is not None else set()
    if "record" in actions and len(actions - {None, "return"}) > 1:
        raise ProbeError(f"{target.spec}: the probes at {target.address:#x} share one action; "
                         f"action={action!r} cannot join theirs "
                         f"({', '.join(sorted({repr(p.action) for p in point.probes}))})")
