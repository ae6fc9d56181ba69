"""The dynamic loader's library-list events (the r_debug protocol), watched by one internal probe.

The dynamic loader keeps its list of loaded objects in `struct r_debug` (found through the
`_r_debug` symbol of ld.so, or DT_DEBUG) and calls an empty function, r_debug.r_brk
(`_dl_debug_state` in glibc), at every change: with r_state = RT_ADD or RT_DELETE before it
maps or unmaps objects, and RT_CONSISTENT once the list is whole again -- after a dlopen has
mapped and relocated the new objects and before their constructors run, after a dlclose has
unmapped them, and once at startup when every DT_NEEDED library is in. Debuggers put a
breakpoint there (gdb's shared-library event breakpoint); pyprobes puts one internal probe,
owned by LoaderEvents, and calls every subscriber at each RT_CONSISTENT report:

    events = engine.loader
    events.subscribe(on_libraries_changed)   # False: no dynamic loader (static) or no watch
    events.watching, events.r_debug, events.reports

Pending probes (pending.py) and return probes (retprobe.py: the C++ unwinder) subscribe.
An exec forgets the hook and the subscribers (Engine.on_exec): they subscribe again in the
new image.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from ..symbols import AT_BASE, ElfFile, Module, Target, auxv_value, modules, symbolize
from ..tracee import Memory, Tracee
from .probe import ProbeError

if TYPE_CHECKING:
    from .probe import Probe, ProbePlacer

__all__ = ["LOADER_HOOKS", "RT_ADD", "RT_CONSISTENT", "RT_DELETE", "LoaderEvents", "Subscriber", "find_loader",
           "interpreter_base", "loader_state"]

# Names of r_brk in the loaders gdb knows (glibc's is _dl_debug_state).
LOADER_HOOKS = ("_dl_debug_state", "r_debug_state", "_r_debug_state", "rtld_db_dlactivity")
R_DEBUG_SYMBOL = "_r_debug"
R_BRK, R_STATE = 16, 24  # offsets in struct r_debug {int r_version; link_map *r_map; r_brk; r_state; ...}
RT_CONSISTENT, RT_ADD, RT_DELETE = 0, 1, 2



def data_symbol(path: str, name: str) -> int | None:
    """st_value of the data object NAME in the ELF file at PATH, or None."""
    try:
        return ElfFile.load(path).object_address(name)
    except (OSError, ValueError):
        return None  # not readable, not ELF: no r_debug, every loader event is a sync


def interpreter_base(pid: int) -> int | None:
    """AT_BASE of PID: the dynamic loader's load address, 0 for a static program, None if unknown."""
    return auxv_value(pid, AT_BASE)


def _loader_hook(mods: list[Module]) -> Target | None:
    """r_brk by name, looked up directly: a miss through resolve() would search every symbol
    for near misses (0.1-0.4 s in a static program)."""
    for name in LOADER_HOOKS:
        for mod in mods:
            for sym in mod.elf.lookup(name):
                address = mod.to_runtime(sym.address)
                return Target(address, mod, sym, address, 0, f"{mod.name}:{name}")
    return None


def find_loader(pid: int, mods: list[Module], memory: Memory) -> tuple[Target, int | None] | None:
    """Where the loader reports its changes (r_brk) and its struct r_debug (None if unknown);
    None for a program without a dynamic loader. The loader is the module the kernel mapped as
    the program's interpreter (AT_BASE): a static program carries _dl_debug_state and _r_debug
    too, for a static dlopen, but never reports its (one, fixed) library list there."""
    base = interpreter_base(pid)
    if base == 0:
        return None
    if base is not None:
        mods = [m for m in mods if m.base == base] or mods
    target = _loader_hook(mods)
    if target is None:
        return None
    mod = target.module
    value = data_symbol(mod.elf.path, R_DEBUG_SYMBOL)
    r_debug = mod.to_runtime(value) if value else None
    if r_debug is not None:
        try:
            r_brk = memory.read_u64(r_debug + R_BRK)
        except OSError:
            r_brk = 0
        if r_brk and r_brk != target.address:  # zero until the loader has run (an exec stop)
            where = symbolize(r_brk, mods)
            if where is not None and where.symbol is not None:
                target = where
    return target, r_debug


def loader_state(memory: Memory, r_debug: int | None) -> int:
    """r_debug.r_state: RT_CONSISTENT, RT_ADD or RT_DELETE (RT_CONSISTENT when unknown)."""
    if r_debug is None:
        return RT_CONSISTENT
    try:
        return int.from_bytes(memory.read(r_debug + R_STATE, 4), "little")
    except OSError:
        return RT_CONSISTENT


Subscriber = Callable[[], None]


class LoaderEvents:
    """One process image's loader events: a single internal probe on r_brk, placed by the first
    subscribe() (or watch()), and the callbacks to call at each RT_CONSISTENT report."""

    def __init__(self, placer: "ProbePlacer", tracee: Tracee) -> None:
        self._placer = placer
        self._tracee = tracee
        self._subscribers: list[Subscriber] = []
        self.hook: "Probe | None" = None    # the internal probe on r_brk
        self.r_debug: int | None = None     # runtime address of struct r_debug, when known
        self.no_loader = False              # static program (or the hook failed): no events will come
        self.error: str | None = None       # why the hook could not be placed
        self.reports = 0                    # every report the loader made (any r_state)

    @property
    def watching(self) -> bool:
        """Whether the hook is in place (the loader itself may have been unmapped since)."""
        return self.hook is not None and not self.hook.removed

    def watch(self, mods: list[Module] | None = None) -> bool:
        """Place the probe on the loader's hook if it is not there yet (MODS: the modules
        loaded now, if the caller has read them). False for a program without a dynamic
        loader, or if the hook cannot be probed (see error)."""
        if self.hook is not None and self.hook.removed:
            self.hook = None  # the loader itself was unmapped with its module
        if self.hook is not None:
            return True
        if self.no_loader:
            return False
        pid = self._tracee.pid
        if mods is None:
            try:
                mods = modules(pid)
            except (OSError, LookupError):
                return False
        found = find_loader(pid, mods, self._tracee.memory)
        if found is None:
            self.no_loader = True  # a static program: what is loaded now is all there will be
            return False
        target, self.r_debug = found
        try:
            self.hook = self._placer.add_probe(target, pre=self._on_report)
        except (ProbeError, OSError) as e:
            self.no_loader = True
            self.error = f"cannot watch the dynamic loader ({e})"
            return False
        return True

    def subscribe(self, callback: Subscriber, mods: list[Module] | None = None) -> bool:
        """Call CALLBACK (no arguments, from inside the loader's stop) at each RT_CONSISTENT
        report, after the subscribers before it; once, however often it subscribes. Returns
        watch(MODS)."""
        if callback not in self._subscribers:
            self._subscribers.append(callback)
        return self.watch(mods)

    def unsubscribe(self, callback: Subscriber) -> None:
        """No more calls to CALLBACK (safe from inside it). The hook stays: it costs one stop
        per library load."""
        if callback in self._subscribers:
            self._subscribers.remove(callback)

    def state(self) -> int:
        """r_debug.r_state now: RT_CONSISTENT, RT_ADD or RT_DELETE (RT_CONSISTENT when unknown)."""
        return loader_state(self._tracee.memory, self.r_debug)

    def _on_report(self, tid: int, regs: Any) -> None:
        self.reports += 1
        if self.state() != RT_CONSISTENT:
            return  # objects being mapped or unmapped: the list is not whole yet
        first_error: Exception | None = None
        for callback in list(self._subscribers):
            try:
                callback()
            except Exception as e:  # the others still hear of it; the engine reports the first
                first_error = first_error or e
        if first_error is not None:
            raise first_error

    def forget(self) -> None:
        """After exec: the old image's loader, hook and subscribers are gone."""
        self._subscribers.clear()
        self.hook = None
        self.r_debug = None
        self.no_loader = False
        self.error = None
