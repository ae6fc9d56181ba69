"""How a probe at each function's entry would run, without placing one (what `pyprobes list` shows).

The same decode-from-the-symbol-start and classification a probe gets when it is placed, read
from the file's bytes (a binary) or from a running process's modules (link-time code, runtime
addresses), so a library user can ask what the CLI asks; and whether a count-only probe there
would be jump-optimised, by the optimizer's own checks (find_region on the whole function, then
the module sweep: nothing in the file branches or points into the patched bytes past the first).
What only the running process decides is not foreseen: a trampoline page that cannot be mapped
within ±2 GiB, or another probe inside the patched bytes.
"""
from __future__ import annotations

import difflib
import fnmatch
import os
import re
from dataclasses import dataclass
from typing import Iterable

from ..errors import PyprobesError
from ..symbols import CodeReader, ElfError, ElfFile, Symbol, SymbolError, main_module, modules, resolve
from ..symbols.elf import preference
from ..x86 import (Kind, MidInstructionError, Refusal, RelocationError, classify, count_trampoline,
                   find_region, instruction_at, TRAMPOLINE_SLOT_SIZE)
from .sweep import ModuleSweep

@dataclass(frozen=True)
class FunctionPlan:
    """One function and what a probe at its entry would be."""

    module: str        # the module's file name
    address: int       # link-time for a binary, runtime for a process
    size: int
    name: str
    probe: str         # "boosted", "emulated", "stepped", or "refused: WHY"
    instruction: str   # its first instruction, as disassembled ("" if unreadable)
    # why a count-only probe at its entry would stay a breakpoint; "" when it would be
    # jump-optimised (mode "optimized": counted in the process, no stop per hit)
    not_optimized: str = ""

    @property
    def optimized(self) -> bool:
        """Whether a count-only probe here would be jump-optimised."""
        return not self.not_optimized


def _plan(module_name: str, address: int, name: str, module: ModuleSweep, sym: Symbol) -> FunctionPlan:
    probe, instruction = _verdict(module.code, sym)
    why = "no probe can be placed here" if probe.startswith("refused") else _not_optimized(module, sym)
    return FunctionPlan(module_name, address, sym.size, name, probe, instruction, why)


def _not_optimized(module: ModuleSweep, sym: Symbol) -> str:
    """Why a count-only probe at SYM's entry would not be jump-optimised ("" if it would be)."""
    try:
        data = module.code.read(sym.address, sym.size) if sym.size > 0 else b""
        region = find_region(data, sym.address, sym.size, sym.address, module.code.read)
    except (ValueError, ElfError, MidInstructionError) as e:
        return str(e)
    if isinstance(region, Refusal):
        return region.reason
    reached = module.reached_inside(region.start, region.end)
    if reached is not None:
        return (f"a branch or address in {os.path.basename(module.code.elf.path)} reaches "
                f"{reached:#x}, inside the bytes {region.start:#x}..{region.end:#x} a jmp would replace")
    try:  # as placed, with the trampoline 1 MiB away (the slot cache maps it near the module)
        trampoline = count_trampoline(region, region.start + (1 << 20), region.start + (1 << 20) + 4096)
    except RelocationError as e:
        return str(e)
    if len(trampoline.code) > TRAMPOLINE_SLOT_SIZE:
        return (f"its trampoline takes {len(trampoline.code)} bytes, more than a "
                f"{TRAMPOLINE_SLOT_SIZE}-byte slot")
    return ""


def _verdict(code: CodeReader, sym: Symbol) -> tuple[str, str]:
    """(what a probe at SYM's entry would be, its first instruction)."""
    extra = " (ifunc resolver)" if sym.kind == "ifunc" else ""
    try:
        data = code.read(sym.address, 16 if not sym.size else min(sym.size, 16))
        insn = instruction_at(data, sym.address, sym.address)
    except (ValueError, ElfError, MidInstructionError) as e:
        return f"refused: cannot read its code ({e})", ""
    if insn.is_invalid:
        return "refused: invalid instruction", insn.text
    c = classify(insn)
    if c.kind is Kind.REFUSE:
        return f"refused: {c.reason}{extra}", insn.text
    return c.kind.value + extra, insn.text


def _one_per_address(functions: Iterable[Symbol], pattern: str | None) -> list[Symbol]:
    """One symbol per address (aliases are one function), names matching PATTERN."""
    match = re.compile(fnmatch.translate(pattern)).match if pattern else None
    skip_cold = not pattern or ".cold" not in pattern  # gcc's cold fragments are not functions
    chosen: dict[int, Symbol] = {}
    for sym in functions:
        if match is not None and not match(sym.name):
            continue
        if skip_cold and ".cold" in sym.name:
            continue
        old = chosen.get(sym.address)
        if old is None or preference(sym) < preference(old):
            chosen[sym.address] = sym
    return [chosen[a] for a in sorted(chosen)]


def functions_of_binary(path: str, pattern: str | None = None) -> list[FunctionPlan]:
    """Every function of the ELF file PATH whose name matches the glob PATTERN, at link-time
    addresses. Raises ElfError (not an ELF file it can read), OSError, SymbolError (nothing
    matches PATTERN, with the nearest names), PyprobesError (no function symbols at all)."""
    elf = ElfFile.load_with_debug(path)
    syms = _one_per_address(elf.functions, pattern)
    if not syms:
        if pattern is None:
            raise PyprobesError(f"{path}: no function symbols")
        stem = re.sub(r"\[[^\]]*\]|[*?]", "", pattern)
        near = difflib.get_close_matches(stem, sorted({s.name for s in elf.functions}), n=5, cutoff=0.6)
        hint = f"; did you mean: {', '.join(near)}?" if near else ""
        raise SymbolError(f"no functions match {pattern!r} in {os.path.basename(path)}{hint}")
    module = ModuleSweep(elf)
    name = os.path.basename(path)
    return [_plan(name, s.address, s.name, module, s) for s in syms]


def functions_of_process(pid: int, pattern: str | None = None) -> list[FunctionPlan]:
    """Every function a probe spec PATTERN ([MODULE:]GLOB; default: all of the executable's)
    matches in the running process PID, at runtime addresses. Raises SymbolError (a bad or
    unmatched spec), ProcessLookupError, PermissionError, LookupError."""
    mods = modules(pid)
    spec = pattern if pattern else f"{main_module(pid, mods).path}:*"
    files: dict[int, ModuleSweep] = {}
    out = []
    for t in resolve(pid, spec, mods):
        if t.symbol is None:
            continue
        module = files.get(id(t.module.elf))
        if module is None:
            module = files[id(t.module.elf)] = ModuleSweep(t.module.elf)
        sym = t.symbol
        out.append(_plan(t.module.name, t.address, sym.name + (f"+{t.offset:#x}" if t.offset else ""),
                         module, sym))
    return out
