"""An IFUNC probed where its callers go: the implementation the loader selected for it.

An IFUNC's symbol (STT_GNU_IFUNC: glibc's strlen, memcpy...) is its resolver, a function the
loader calls once, at relocation, to pick an implementation for this CPU; a probe there
counts that one call. What the loader picked is in the GOT once relocation is done:

  1. the IRELATIVE relocations of the IFUNC's own module whose addend is the resolver: the
     loader stored the resolver's answer in their slots (libc's own calls to strlen);
  2. else the JUMP_SLOT and GLOB_DAT relocations naming the IFUNC (a library's calls to an
     IFUNC it exports, other modules' calls), whose slots hold it once they are bound
     (BIND_NOW, or after a first call).

A slot counts only if it holds the start of a function of the IFUNC's module other than the
resolver: before relocation it holds the file's value (0, a PLT stub, an unbiased address).
When no slot does (at the exec stop, in a library dlopen is mapping, in a static program
before its start-up code ran) the target stays the resolver: Target.is_ifunc_resolver says so.
"""
from __future__ import annotations

from typing import Callable

from ..symbols import Module, Target
from ..symbols.relocs import relocations

ReadWord = Callable[[int], int]  # the 8 bytes at a runtime address of the process


def follow_ifuncs(targets: list[Target], mods: list[Module], read_word: ReadWord) -> list[Target]:
    """TARGETS with each IFUNC entry replaced by the implementation the loader selected, once
    per address: a glob matching both `strlen` and `__strlen_avx2` gives one target, named
    after the IFUNC (two probes on one address would count every hit twice)."""
    if not any(t.is_ifunc_resolver for t in targets):
        return targets
    out: dict[int, Target] = {}
    for target in targets:
        if target.is_ifunc_resolver:
            target = selected_implementation(target, mods, read_word) or target
        kept = out.get(target.address)
        if kept is None or (kept.ifunc is None and target.ifunc is not None):
            out[target.address] = target
    return list(out.values())


def selected_implementation(target: Target, mods: list[Module], read_word: ReadWord) -> Target | None:
    """The implementation the loader selected for the IFUNC at TARGET, or None if none is yet."""
    mod, ifunc = target.module, target.symbol
    assert ifunc is not None
    slots = [mod.to_runtime(s) for s in relocations(mod.elf).irelative.get(ifunc.address, ())]
    if "@" not in ifunc.name:  # an old version (memcpy@GLIBC_2.2.5) is bound by no name
        for other in [mod] + [m for m in mods if m is not mod]:
            slots += [other.to_runtime(s) for s in relocations(other.elf).bound.get(ifunc.name, ())]
    for slot in slots:
        try:
            value = read_word(slot)
        except OSError:
            continue
        found = _function_start(mod, value, ifunc.address)
        if found is not None:
            return Target(value, mod, found, value, 0, target.spec, target.is_return, ifunc=ifunc)
    return None


def _function_start(mod: Module, address: int, resolver: int):
    """The function of MOD starting at runtime ADDRESS, unless it is the resolver; else None."""
    mapping = mod.mapping_at(address)
    if mapping is None or not mapping.executable:
        return None
    link = mod.to_link(address)
    if link == resolver:
        return None
    sym = mod.elf.function_containing(link)
    if sym is None or sym.address != link or sym.kind == "ifunc":
        return None
    return sym
