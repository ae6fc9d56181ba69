"""Pending probes: probes on libraries that are not loaded yet, armed the moment the loader maps them.

They follow the dynamic loader's reports (loader.py: LoaderEvents, one probe on r_brk shared
with return probes).

At each RT_CONSISTENT the process's modules are read again (/proc/PID/maps):
  - a pending probe whose module appeared is placed (several, for a glob);
  - every probe in a module that disappeared is dropped from the engine *without writing*
    the original byte back: the memory is gone, and whatever is mapped there now is not ours.
    A pending probe whose module went goes back to waiting, and is armed again if the
    library is loaded again; its hits so far are kept.
After an exec the new image's loader is watched the same way, and every pending probe is
placed again in the new program at its first RT_CONSISTENT (a static program: at once).

    pp = proc.probe("libplug:plug_fn", pending=True)   # or probe_all / return_probe
    proc.run()
    pp.state, pp.hits, pp.probes
"""
from __future__ import annotations

import os
from typing import Callable, Protocol

from ..errors import PyprobesError
from ..symbols import Module, SymbolError, Target, find_module, modules, parse_spec
from ..tracee import Tracee
from .loader import LoaderEvents
from .probe import Handler, Probe, ProbeError
from .retprobe import DEFAULT_MAXACTIVE, EntryHandler, ReturnHandler, ReturnProbe, ReturnProbes

ModKey = tuple[str, int]  # (path, base): one mapping of one file
Notify = Callable[[str, "PendingProbe | None", str], None]


def module_key(mod: Module) -> ModKey:
    return (mod.path, mod.base)


class PendingProbe:
    """A probe spec that follows the program: placed wherever and whenever its module is loaded.

    state: "pending" (its module is not loaded yet), "armed", "unloaded" (its module was
    dlclosed or replaced by an exec; armed again if it comes back), "failed" (the module came
    but the spec could not be placed there: see error), "removed".
    hits / missed add up every probe ever placed for it, across loads and execs."""

    def __init__(self, owner: "PendingProbes", spec: str, kind: str, many: bool,
                 pre: Handler | None, post: Handler | None, boost: bool,
                 handler: ReturnHandler | None, entry: EntryHandler | None, maxactive: int,
                 pre_for: Callable[[Target], Handler | None] | None,
                 handler_for: Callable[[Target], ReturnHandler | None] | None,
                 skip_refused: bool) -> None:
        self._owner = owner
        self.spec = spec
        self.parsed = parse_spec(spec)
        self.kind = kind  # "entry" or "return"
        self.many = many
        self.pre, self.post, self.boost = pre, post, boost
        self.action: str | None = None  # "count": see Process.probe
        self.handler, self.entry, self.maxactive = handler, entry, maxactive
        self.pre_for, self.handler_for = pre_for, handler_for
        self.skip_refused = skip_refused
        self.state = "pending"
        self.error: str | None = None
        self.instances: dict[ModKey, list[Probe | ReturnProbe]] = {}
        self.history: list[Probe | ReturnProbe] = []  # every probe ever placed, in order
        self.skipped: list[tuple[str, str]] = []      # (function, why) left out of a glob
        self._failed: set[ModKey] = set()             # modules where placing failed: not retried
        self._resolved_once = False                    # a spec without module: resolved in this image

    @property
    def module(self) -> str | None:
        return self.parsed.module

    @property
    def probes(self) -> list[Probe | ReturnProbe]:
        """The probes placed now."""
        return [p for placed in self.instances.values() for p in placed]

    @property
    def hits(self) -> int:
        return sum(p.hits for p in self.history)

    @property
    def missed(self) -> int:
        return sum(p.missed for p in self.history)

    @property
    def mode(self) -> str:
        live = self.probes
        if not live:
            return self.state
        if self.kind == "return":
            return "return"
        modes = {p.mode for p in live}
        return modes.pop() if len(modes) == 1 else "mixed"

    def remove(self) -> None:
        if self.state == "removed":
            return
        for p in self.probes:
            p.remove()
        self.instances.clear()
        self.state = "removed"
        self._owner.specs.remove(self)

    def __repr__(self) -> str:
        return f"<PendingProbe {self.spec} {self.state} probes={len(self.probes)} hits={self.hits}>"


class PendingHost(Protocol):
    """What pending probes need of the engine (the Engine provides it)."""

    tracee: Tracee
    returns: ReturnProbes
    loader: LoaderEvents
    exec_hooks: list[Callable[[], None]]

    def add_probe(self, target: Target, pre: Handler | None = None, post: Handler | None = None,
                  boost: bool = True, action: str | None = None) -> Probe: ...

    def drop_probes_in(self, inside: Callable[[int], bool]) -> int: ...


class PendingProbes:
    """Every pending probe of one process; subscribed to its loader's events while it has some."""

    def __init__(self, engine: PendingHost) -> None:
        self.engine = engine
        self.loader = engine.loader
        self.specs: list[PendingProbe] = []
        self.known: dict[ModKey, Module] | None = None  # the modules at the last sync
        self.on_change: Notify | None = None    # (what, pending probe or None, detail)
        self._stats = {"syncs": 0, "armed": 0, "dropped": 0}
        self._told: str | None = None           # the loader watch's failure, once reported
        engine.exec_hooks.append(self._on_exec)

    @property
    def pid(self) -> int:
        return self.engine.tracee.pid

    @property
    def stats(self) -> dict[str, int]:
        return {"loader_events": self.loader.reports, **self._stats}

    # ------------------------------------------------------------------ adding
    def add(self, spec: str, kind: str = "entry", many: bool = False, pre: Handler | None = None,
            post: Handler | None = None, boost: bool = True, handler: ReturnHandler | None = None,
            entry: EntryHandler | None = None, maxactive: int = DEFAULT_MAXACTIVE,
            pre_for: Callable[[Target], Handler | None] | None = None,
            handler_for: Callable[[Target], ReturnHandler | None] | None = None,
            skip_refused: bool = False, action: str | None = None) -> PendingProbe:
        """Place SPEC now if its module is loaded (errors raise, as for a plain probe), else
        keep it pending until the loader maps the module. A spec without a module must
        resolve now."""
        if not isinstance(spec, str):
            raise ProbeError(f"a pending probe needs a [MODULE:]SYMBOL spec, not {spec!r}")
        try:
            pp = PendingProbe(self, spec, kind, many, pre, post, boost, handler, entry, maxactive,
                              pre_for, handler_for, skip_refused)
        except SymbolError as e:
            raise ProbeError(str(e)) from None
        pp.action = action
        mods = self._modules()
        self._watch(mods)
        if self.known is None:
            self.known = {module_key(m): m for m in mods}
        if pp.parsed.module is not None:
            try:
                mod = find_module(mods, pp.parsed.module)
            except SymbolError as e:
                if not str(e).startswith("no module"):
                    raise ProbeError(str(e)) from None
                if not self.loader.watching:
                    raise ProbeError(f"module {pp.parsed.module!r} is not loaded in process {self.pid}, "
                                     "and it has no dynamic loader to load it later") from None
                self.specs.append(pp)
                return pp
            self._arm(pp, mods, [mod], raising=True)
        else:
            self._arm(pp, mods, None, raising=True)
        self.specs.append(pp)
        return pp

    def _modules(self) -> list[Module]:
        try:
            return modules(self.pid)
        except ProcessLookupError:
            raise ProbeError(f"process {self.pid} is gone") from None

    # ------------------------------------------------------------------ the loader watch
    def _watch(self, mods: list[Module]) -> None:
        """Follow the loader's events (one internal probe on its r_brk, per image)."""
        loader = self.loader
        if loader.subscribe(self._on_libraries_changed, mods) or loader.error is None:
            return
        if self._told != loader.error:
            self._told = loader.error
            self._notify("failed", None, f"{loader.error}: libraries loaded from now on will not be probed")

    def _on_libraries_changed(self) -> None:
        try:
            self.sync()
        except Exception as e:  # reported, never raised into the hit path
            self._notify("failed", None, f"while following the loader: {type(e).__name__}: {e}")

    # ------------------------------------------------------------------ syncing
    def sync(self) -> None:
        """The module list is consistent: drop probes of modules gone, arm pending probes."""
        self._stats["syncs"] += 1
        try:
            mods = modules(self.pid)
        except ProcessLookupError:
            return
        now = {module_key(m): m for m in mods}
        if self.known is not None:
            gone = [m for key, m in self.known.items() if key not in now]
            if gone:
                self._drop_modules(gone)
        self.known = now
        for pp in list(self.specs):
            for key in [k for k in pp.instances if k not in now]:
                del pp.instances[key]
                if not pp.instances:
                    pp.state = "unloaded"
                    self._notify("unloaded", pp, key[0])
            for key in [k for k in pp._failed if k not in now]:
                pp._failed.discard(key)
            if pp.parsed.module is not None:
                try:
                    mod = find_module(mods, pp.parsed.module)
                except SymbolError:
                    continue
                key = module_key(mod)
                if key in pp.instances or key in pp._failed:
                    continue
                self._arm(pp, mods, [mod], raising=False)
            elif not pp._resolved_once:
                self._arm(pp, mods, None, raising=False)

    def _drop_modules(self, gone: list[Module]) -> None:
        """Every probe in GONE's address ranges leaves the engine, with nothing written back."""
        ranges = [(m.start, m.end) for mod in gone for m in mod.mappings]

        def inside(address: int) -> bool:
            return any(lo <= address < hi for lo, hi in ranges)

        self._stats["dropped"] += self.engine.drop_probes_in(inside)

    def _arm(self, pp: PendingProbe, mods: list[Module], within: list[Module] | None,
             raising: bool) -> None:
        """Place PP's probes in the modules loaded now (WITHIN, or anywhere for a spec without one)."""
        pp._resolved_once = True
        try:
            spec = pp.parsed
            if not raising and spec.symbol is not None and not spec.is_glob and not spec.is_usdt:
                # From inside the program's loader event: no did-you-mean search over every
                # symbol (0.1-0.4 s) for a name that is simply not there.
                search = within if within is not None else mods
                if not any(mod.elf.lookup(spec.symbol) for mod in search):
                    where = search[0].name if within else f"process {self.pid}"
                    raise SymbolError(f"no function {spec.symbol!r} in {where}")
            targets = self.engine.targets(spec, mods)
            if pp.kind == "return" and not pp.many and len(targets) != 1:
                raise ProbeError(f"{pp.spec!r} matches {len(targets)} functions: a return probe needs "
                                 "exactly one")
            if not pp.many and len(targets) != 1:
                names = ", ".join(t.name for t in targets[:5])
                raise ProbeError(f"{pp.spec!r} matches {len(targets)} functions ({names}...): "
                                 "use probe_all()")
        except (SymbolError, ProbeError) as e:
            if raising:
                raise ProbeError(str(e)) from None
            for mod in within or []:
                pp._failed.add(module_key(mod))
            pp.state = "failed" if not pp.instances else pp.state
            pp.error = str(e)
            # A spec without a module, looked for again in the program an exec started: that
            # program simply may not have it ("missing"), unlike a module that came without it.
            self._notify("failed" if within else "missing", pp, str(e))
            return
        placed: dict[ModKey, list] = {}
        first_error: str | None = None
        skipped_before = len(pp.skipped)
        for target in targets:
            try:
                probe = self._place(pp, target)
            except ProbeError as e:
                if pp.skip_refused and pp.many:
                    pp.skipped.append((target.name, str(e)))
                    continue
                if raising:
                    for probes in placed.values():
                        for p in probes:
                            p.remove()
                    raise
                first_error = first_error or str(e)
                continue
            except (PyprobesError, OSError) as e:
                if raising:
                    for probes in placed.values():
                        for p in probes:
                            p.remove()
                    raise ProbeError(f"cannot probe {target.name}: {e}") from None
                first_error = first_error or str(e)
                continue
            placed.setdefault(module_key(target.module), []).append(probe)
        for key, probes in placed.items():
            pp.instances.setdefault(key, []).extend(probes)
            pp.history.extend(probes)
            self._stats["armed"] += len(probes)
        if pp.instances:
            pp.state = "armed"
        if not raising:  # placed later, from the loader's event: say so (add()'s caller knows)
            for probes in placed.values():
                for p in probes:
                    self._notify("armed", pp, p.name)
        if not raising and len(pp.skipped) > skipped_before:
            self._notify("skipped", pp, f"{len(pp.skipped) - skipped_before} matching functions "
                                        "cannot be probed and were left out")
        if first_error is not None or not placed:
            for mod in within or []:
                if module_key(mod) not in placed:
                    pp._failed.add(module_key(mod))
            if not pp.instances:
                pp.state = "failed"
            pp.error = first_error or "nothing could be placed"
            if not raising:
                self._notify("failed", pp, pp.error)
            elif not placed:
                raise ProbeError(f"{pp.spec}: {pp.error}")

    def _place(self, pp: PendingProbe, target: Target) -> Probe | ReturnProbe:
        engine = self.engine
        if pp.kind == "return":
            handler = pp.handler_for(target) if pp.handler_for is not None else pp.handler
            return engine.returns.add(target, handler, entry=pp.entry, maxactive=pp.maxactive, action=pp.action)
        pre = pp.pre_for(target) if pp.pre_for is not None else pp.pre
        # A factory's handler for this target makes it a breakpoint probe; without one, the action.
        action = pp.action if pre is None and pp.post is None else None
        return engine.add_probe(target, pre=pre, post=pp.post, boost=pp.boost, action=action)

    # ------------------------------------------------------------------ exec
    def _on_exec(self) -> None:
        """A new image: the engine dropped every probe and forgot the loader watch. Watch the new
        loader; every spec waits for the new program's libraries (RT_CONSISTENT at its startup),
        static ones are armed now."""
        self.known = None
        self._told = None
        for pp in self.specs:
            pp.instances.clear()
            pp._failed.clear()
            pp._resolved_once = False
            pp.state = "unloaded" if pp.history else "pending"
        try:
            exe = os.readlink(f"/proc/{self.pid}/exe")
        except OSError:
            exe = "?"
        self._notify("exec", None, exe)
        if not self.specs:
            return
        try:
            mods = modules(self.pid)
        except ProcessLookupError:
            return
        self.known = {module_key(m): m for m in mods}
        self._watch(mods)
        if not self.loader.watching:
            self.sync()

    def _notify(self, what: str, pp: PendingProbe | None, detail: str) -> None:
        if self.on_change is not None:
            try:
                self.on_change(what, pp, detail)
            except Exception:
                pass
