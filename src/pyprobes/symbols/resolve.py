"""From what a user types ("libc:puts+4", "*alloc", 0x401136) to runtime addresses.

Grammar (kprobes-like)::

    [MODULE:]SYMBOL[+OFFSET][%return]    SYMBOL may be a glob: * ? [...]
    MODULE:0xADDR[+OFFSET][%return]      a link-time address in MODULE
    0xADDR | 1234 | an int               a runtime address
    usdt:[MODULE:]PROVIDER:NAME          a USDT probe site (symbols/usdt.py); globs in all three

Any spec may end in a type list, SPEC(T1,T2,...), T one of TYPES: how to show its arguments.
"""
from __future__ import annotations

import difflib
import fnmatch
import os
import re
from dataclasses import dataclass

from ..errors import PyprobesError

from . import maps as _maps
from .elf import Symbol, preference
from .maps import Module
from .usdt import UsdtProbe, usdt_probes

__all__ = ["SymbolError", "Spec", "Target", "TYPES", "parse_spec", "resolve", "find_module", "symbolize"]

TYPES = ("int", "uint", "hex", "str", "ptr", "double")


class SymbolError(PyprobesError, LookupError):
    """A probe spec that cannot be resolved; the message is one line for the user."""


@dataclass(frozen=True)
class Spec:
    """A parsed probe spec. Exactly one of ``symbol`` and ``address`` is set."""

    text: str
    module: str | None = None
    symbol: str | None = None
    address: int | None = None  # link-time if module is set, else runtime
    offset: int = 0
    is_return: bool = False
    provider: str | None = None  # set for a USDT spec; symbol is then the probe's name
    types: tuple[str, ...] | None = None  # the spec's type list, if it has one

    @property
    def is_glob(self) -> bool:
        return self.symbol is not None and any(c in self.symbol for c in "*?[")

    @property
    def is_usdt(self) -> bool:
        return self.provider is not None


@dataclass(frozen=True)
class Target:
    """One resolved probe location in a running process."""

    address: int  # runtime
    module: Module
    symbol: Symbol | None  # the enclosing function, if any
    symbol_address: int  # runtime start of that function (== address without one)
    offset: int  # address - symbol_address
    spec: str
    is_return: bool = False
    ifunc: Symbol | None = None  # the IFUNC whose selected implementation this is (engine/ifunc.py)
    usdt: UsdtProbe | None = None  # the USDT probe whose site this is

    @property
    def name(self) -> str:
        """Human name: "libc.so.6:puts+0x4", "prog:0x1139" with no enclosing function, or
        "libc.so.6:strlen -> __strlen_avx2" for the implementation the loader chose for an IFUNC."""
        if self.usdt is not None:
            return f"usdt:{self.module.name}:{self.usdt.full_name}"
        if self.symbol is None:
            return f"{self.module.name}:0x{self.module.to_link(self.address):x}"
        if self.ifunc is not None:
            return f"{self.module.name}:{self.ifunc.name} -> {self.symbol.name}"
        suffix = f"+0x{self.offset:x}" if self.offset else ""
        return f"{self.module.name}:{self.symbol.name}{suffix}"

    @property
    def is_ifunc_resolver(self) -> bool:
        """At the entry of an IFUNC's resolver: the resolver runs once, when the loader binds the
        symbol, so a probe here counts that and not the calls to the function."""
        return self.symbol is not None and self.symbol.kind == "ifunc" and not self.offset


_NUMBER = re.compile(r"(?:0[xX][0-9a-fA-F]+|[0-9]+)\Z")
_SYMBOL = re.compile(r"[A-Za-z_.$*?\[][A-Za-z0-9_.$@*?\[\]!^-]*\Z")
_RETURN = "%return"


def _number(text: str) -> int:
    # int(text, 0) would reject "010"; a leading zero is still decimal here.
    return int(text, 16) if text[:2].lower() == "0x" else int(text, 10)


def parse_spec(spec: str | int) -> Spec:
    """Parse SPEC; SymbolError on bad syntax."""
    if isinstance(spec, bool):
        raise SymbolError(f"bad probe spec {spec!r}")
    if isinstance(spec, int):
        if spec < 0:
            raise SymbolError(f"bad address {spec:#x}: negative")
        return Spec(text=f"0x{spec:x}", address=spec)
    if not isinstance(spec, str):
        raise SymbolError(f"bad probe spec {spec!r}: expected a string or an int")
    text = spec
    body = spec.strip()
    if not body:
        raise SymbolError("empty probe spec")
    body, types = _type_list(body, text)
    if body.startswith(_USDT):
        return _usdt_spec(body[len(_USDT):], text, types)
    is_return = False
    if "%" in body:
        body, pct, flag = body.partition("%")
        if pct + flag != _RETURN:
            raise SymbolError(f"bad probe spec {text!r}: unknown flag %{flag} (only %return)")
        is_return = True
    module, colon, rest = body.rpartition(":")
    if colon and not module:
        raise SymbolError(f"bad probe spec {text!r}: empty module name before ':'")
    target, plus, off_text = rest.partition("+")
    offset = 0
    if plus:
        if not _NUMBER.match(off_text):
            raise SymbolError(
                f"bad offset {off_text!r} in {text!r}: expected a decimal or 0x-hex number"
            )
        offset = _number(off_text)
    if not target:
        raise SymbolError(f"bad probe spec {text!r}: no symbol or address")
    if is_return and offset:
        raise SymbolError(f"bad probe spec {text!r}: %return needs a function entry, not an offset")
    if target[0].isdigit():
        if not _NUMBER.match(target):
            raise SymbolError(f"bad address {target!r} in {text!r}: expected a decimal or 0x-hex number")
        address = _number(target)
        return Spec(text, module or None, None, address + offset, 0, is_return, types=types)
    if not _SYMBOL.match(target):
        raise SymbolError(f"bad symbol name {target!r} in {text!r}")
    return Spec(text, module or None, target, None, offset, is_return, types=types)


_USDT = "usdt:"
_USDT_NAME = re.compile(r"[A-Za-z0-9_.*?\[\]!^-]+\Z")


def _type_list(body: str, text: str) -> tuple[str, tuple[str, ...] | None]:
    if not body.endswith(")"):
        if "(" in body or ")" in body:
            raise SymbolError(f"bad type list in {text!r}: expected SPEC(T1,T2,...)")
        return body, None
    head, paren, inner = body[:-1].partition("(")
    if not paren or "(" in inner or ")" in inner or not head:
        raise SymbolError(f"bad type list in {text!r}: expected SPEC(T1,T2,...)")
    types = tuple(t.strip() for t in inner.split(",")) if inner.strip() else ()
    bad = [t for t in types if t not in TYPES]
    if bad:
        raise SymbolError(f"bad type list in {text!r}: unknown type {bad[0]!r}; types are {', '.join(TYPES)}")
    return head.rstrip(), types


def _usdt_spec(body: str, text: str, types: tuple[str, ...] | None) -> Spec:
    parts = body.split(":")
    if len(parts) == 2:
        module, provider, name = None, parts[0], parts[1]
    elif len(parts) >= 3:
        module, provider, name = ":".join(parts[:-2]), parts[-2], parts[-1]
    else:
        raise SymbolError(f"bad USDT spec {text!r}: expected usdt:[MODULE:]PROVIDER:NAME")
    for part in (provider, name):
        if not _USDT_NAME.match(part):
            raise SymbolError(f"bad USDT spec {text!r}: expected usdt:[MODULE:]PROVIDER:NAME")
    if module is not None and not module:
        raise SymbolError(f"bad probe spec {text!r}: empty module name before ':'")
    return Spec(text, module, name, provider=provider, types=types)


# ----------------------------------------------------------------- modules


def find_module(mods: list[Module], name: str) -> Module:
    """The module NAME designates: a path, a file name, or a short name ("libc")."""
    if "/" in name:
        real = os.path.realpath(name)
        hits = [m for m in mods if m.path == name or m.path == real]
    else:
        hits = [m for m in mods if m.name == name]
        if not hits:
            hits = [m for m in mods if m.name.startswith((name + ".", name + "-"))]
    unique = list(dict.fromkeys(hits))
    if len(unique) == 1:
        return unique[0]
    if not unique:
        loaded = ", ".join(dict.fromkeys(m.name for m in mods)) or "none"
        raise SymbolError(f"no module {name!r} in the process; loaded: {loaded}")
    raise SymbolError(f"module name {name!r} is ambiguous: {', '.join(m.path for m in unique)}")


def _search_order(pid: int, mods: list[Module]) -> list[Module]:
    try:
        main = _maps.main_module(pid, mods)
    except LookupError:
        return list(mods)
    return [main] + [m for m in mods if m is not main]


# ----------------------------------------------------------------- targets


def _target(mod: Module, sym: Symbol | None, address: int, spec: Spec) -> Target:
    if sym is None:
        return Target(address, mod, None, address, 0, spec.text, spec.is_return)
    start = mod.to_runtime(sym.address)
    return Target(address, mod, sym, start, address - start, spec.text, spec.is_return)


def _at_symbol(mod: Module, sym: Symbol, spec: Spec) -> Target:
    if spec.offset and sym.size and spec.offset >= sym.size:
        raise SymbolError(
            f"offset 0x{spec.offset:x} is beyond the end of {mod.name}:{sym.name} (size 0x{sym.size:x})"
        )
    return _target(mod, sym, mod.to_runtime(sym.address) + spec.offset, spec)


def symbolize(address: int, mods: list[Module]) -> Target | None:
    """The module and enclosing function of runtime ADDRESS, or None if no module maps it.

    Never raises: for reports (where a thread is, a return address).
    """
    for mod in mods:
        if mod.mapping_at(address) is not None:
            sym = mod.elf.function_containing(mod.to_link(address))
            return _target(mod, sym, address, Spec(text=f"0x{address:x}", address=address))
    return None


def _resolve_address(pid: int, spec: Spec, mods: list[Module]) -> list[Target]:
    assert spec.address is not None
    if spec.module is None:
        target = symbolize(spec.address, mods)
        if target is None:
            raise SymbolError(f"address 0x{spec.address:x} is not in any mapped module of process {pid}")
        mapping = target.module.mapping_at(target.address)
        if mapping is None or not mapping.executable:
            raise SymbolError(f"{spec.text}: 0x{spec.address:x} is not in the code of {target.module.name}")
        target = Target(target.address, target.module, target.symbol, target.symbol_address,
                        target.offset, spec.text, spec.is_return)
    else:
        mod = find_module(mods, spec.module)
        address = mod.to_runtime(spec.address)
        if not mod.elf.is_executable(spec.address):
            raise SymbolError(f"{spec.text}: 0x{spec.address:x} is not in the code of {mod.name}")
        target = _target(mod, mod.elf.function_containing(spec.address), address, spec)
    return [target]


def _glob(spec: Spec, search: list[Module]) -> list[Target]:
    assert spec.symbol is not None
    match = re.compile(fnmatch.translate(spec.symbol)).match
    # gcc's "foo.cold" symbols are fragments of foo jumped to on unlikely
    # paths, not functions: a glob means functions unless it names them.
    skip_cold = ".cold" not in spec.symbol
    out = []
    for mod in search:
        # One target per address: aliases (puts/_IO_puts) are one function.
        chosen: dict[int, Symbol] = {}
        for name in mod.elf.names():
            if not match(name) or (skip_cold and ".cold" in name):
                continue
            for sym in mod.elf.lookup(name):
                old = chosen.get(sym.address)
                if old is None or preference(sym) < preference(old):
                    chosen[sym.address] = sym
        for address in sorted(chosen):
            sym = chosen[address]
            if spec.offset and sym.size and spec.offset >= sym.size:
                continue  # "str*+8" means the functions long enough to have a +8
            out.append(_at_symbol(mod, sym, spec))
    return out


def _named(spec: Spec, search: list[Module], main_first: bool) -> list[Target]:
    """Targets for a plain name.

    Within a module a global definition beats a weak one beats a local one;
    several local definitions (static functions of one name in several
    files) all come back, since nothing says which one the user meant.
    Across modules, with no module given: the executable first (the user's
    own code, locals included), then the first library in load order with a
    global or weak definition, as the dynamic linker would bind it; locals
    in libraries only when nothing exports the name.
    """
    assert spec.symbol is not None

    def pick(mod: Module, bindings: tuple[str, ...]) -> list[Target]:
        syms = [s for s in mod.elf.lookup(spec.symbol) if s.binding in bindings]
        if not syms:
            return []
        best = syms[0].binding
        if best != "local":
            return [_at_symbol(mod, syms[0], spec)]
        return [_at_symbol(mod, s, spec) for s in syms]

    everything = ("global", "weak", "local")
    if main_first:
        main, libs = search[0], search[1:]
        found = pick(main, everything)
        if found:
            return found
        for mod in libs:
            found = pick(mod, ("global", "weak"))
            if found:
                return found
        for mod in libs:
            found = pick(mod, ("local",))
            if found:
                return found
        return []
    for mod in search:
        found = pick(mod, everything)
        if found:
            return found
    return []


def _not_found(spec: Spec, search: list[Module], where: str) -> SymbolError:
    assert spec.symbol is not None
    names: set[str] = set()
    for mod in search:
        names.update(mod.elf.names())
    probe = spec.symbol
    if spec.is_glob:
        probe = re.sub(r"\[[^\]]*\]|[*?]", "", probe)
    near = difflib.get_close_matches(probe, sorted(names), n=5, cutoff=0.6) if probe else []
    if spec.is_glob:
        msg = f"no functions match {spec.symbol!r} in {where}"
    else:
        msg = f"no function {spec.symbol!r} in {where}"
    if near:
        msg += "; did you mean: " + ", ".join(near) + "?"
    return SymbolError(msg)


def resolve(pid: int, spec: str | int | Spec, modules: list[Module] | None = None) -> list[Target]:
    """Runtime targets for SPEC in process PID (one, or one per glob match).

    MODULES reuses a snapshot from ``maps.modules(pid)``. SymbolError when
    nothing matches, with near misses in the message.
    """
    s = spec if isinstance(spec, Spec) else parse_spec(spec)
    mods = modules if modules is not None else _maps.modules(pid)
    if s.is_usdt:
        return _resolve_usdt(pid, s, mods)
    if s.address is not None:
        targets = _resolve_address(pid, s, mods)
    else:
        if s.module is not None:
            search = [find_module(mods, s.module)]
            where = search[0].name
        else:
            search = _search_order(pid, mods)
            where = f"process {pid}"
        if s.is_glob:
            targets = _glob(s, search)
        else:
            targets = _named(s, search, main_first=s.module is None)
        if not targets:
            raise _not_found(s, search, where)
    if s.is_return:
        for t in targets:
            if t.symbol is None or t.offset:
                raise SymbolError(f"{s.text}: %return needs a function entry, and 0x{t.address:x} is not one")
    return targets


def _resolve_usdt(pid: int, spec: Spec, mods: list[Module]) -> list[Target]:
    assert spec.provider is not None and spec.symbol is not None
    if spec.module is not None:
        search, where = [find_module(mods, spec.module)], spec.module
    else:
        search, where = list(dict.fromkeys(_search_order(pid, mods))), f"process {pid}"
    provider = re.compile(fnmatch.translate(spec.provider)).match
    name = re.compile(fnmatch.translate(spec.symbol)).match
    out, seen = [], set()
    for mod in search:
        if mod.path in seen:
            continue
        seen.add(mod.path)
        for probe in usdt_probes(mod.elf):
            if provider(probe.provider) and name(probe.name):
                if spec.types is not None and len(spec.types) > len(probe.args):
                    raise SymbolError(f"bad type list in {spec.text!r}: {probe.full_name} in {mod.name} "
                                      f"has {len(probe.args)} arguments ({probe.args_text or 'none'})")
                address = mod.to_runtime(probe.address)
                sym = mod.elf.function_containing(probe.address)
                t = _target(mod, sym, address, spec)
                out.append(Target(t.address, t.module, t.symbol, t.symbol_address, t.offset, spec.text,
                                  usdt=probe))
    if not out:
        known = sorted({p.full_name for m in search for p in usdt_probes(m.elf)})
        msg = f"no USDT probe {spec.provider}:{spec.symbol} in {where}"
        near = difflib.get_close_matches(f"{spec.provider}:{spec.symbol}", known, n=5, cutoff=0.6)
        if near:
            msg += "; did you mean: " + ", ".join(near) + "?"
        elif not known:
            msg += " (it declares none)"
        raise SymbolError(msg)
    return out
