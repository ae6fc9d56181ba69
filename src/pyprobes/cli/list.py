"""`pyprobes list`: the functions that match, and what a probe at each entry would be."""
from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shutil
import sys

from ..symbols import ElfError, ElfFile, SymbolError, main_module, modules, resolve
from ..symbols.elf import preference
from ..x86 import Kind, MidInstructionError, classify, instruction_at
from .output import CliError

HELP = "list functions and how a probe at each would run"
EPILOG = """\
examples:
  pyprobes list ./prog                 every function of ./prog (link-time addresses)
  pyprobes list /lib/x86_64-linux-gnu/libc.so.6 'str*'
  pyprobes list -p 1234 'libc:mem*'    functions of a running process (runtime addresses)
  pyprobes list -p 1234                every function of its executable

PROBE column: boosted (one stop per hit), emulated (one stop, no slot), stepped (two
stops per hit), or refused with the reason. Written to stdout (or -o FILE).
"""

HEADER = ("MODULE", "ADDRESS", "SIZE", "FUNCTION", "PROBE", "FIRST INSTRUCTION")


def add_parser(sub) -> None:
    p = sub.add_parser("list", help=HELP, usage='%(prog)s [-o FILE] (-p PID [PATTERN] | BINARY [PATTERN])', description=HELP.capitalize() + ".", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-p", "--pid", type=int, help="list functions of this running process")
    p.add_argument("-o", "--output", metavar="FILE", help="write the list to FILE instead of stdout")
    p.add_argument("where", nargs="*", metavar="BINARY|PATTERN",
                   help="BINARY [PATTERN] without -p; [PATTERN] with -p ([MODULE:]GLOB)")
    p.set_defaults(func=run)


class _Code:
    """The file's bytes of executable segments, read once per segment."""

    def __init__(self, elf: ElfFile) -> None:
        self.elf = elf
        self.segments: dict[int, bytes] = {}

    def read(self, vaddr: int, size: int) -> bytes:
        seg = self.elf.segment_for(vaddr)
        if seg is None:
            raise ValueError("not in a loadable segment")
        data = self.segments.get(seg.vaddr)
        if data is None:
            data = self.segments[seg.vaddr] = self.elf.read_vaddr(seg.vaddr, seg.memsz)
        start = vaddr - seg.vaddr
        return data[start:start + size]


def verdict(code: _Code, sym) -> tuple[str, str]:
    """(what a probe at SYM's entry would be, its first instruction)."""
    if sym.kind == "ifunc":
        extra = " (ifunc resolver)"
    else:
        extra = ""
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


def _binary(path: str) -> ElfFile:
    if not os.path.exists(path) and "/" not in path:
        found = shutil.which(path)
        if found:
            path = found
    if not os.path.exists(path):
        raise CliError(f"no such file: {path}", 2)
    try:
        return ElfFile.load_with_debug(path)
    except ElfError as e:
        raise CliError(f"{path}: not an ELF file we can read ({e})", 2) from None
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror}", 1) from None


def _glob_filter(functions, pattern: str | None):
    """One symbol per address (aliases are one function), names matching PATTERN."""
    match = re.compile(fnmatch.translate(pattern)).match if pattern else None
    skip_cold = not pattern or ".cold" not in pattern  # gcc's cold fragments are not functions
    chosen = {}
    for sym in functions:
        if match is not None and not match(sym.name):
            continue
        if skip_cold and ".cold" in sym.name:
            continue
        old = chosen.get(sym.address)
        if old is None or preference(sym) < preference(old):
            chosen[sym.address] = sym
    return [chosen[a] for a in sorted(chosen)]


def rows_for_binary(path: str, pattern: str | None) -> list[tuple]:
    elf = _binary(path)
    if pattern and ":" in pattern:
        raise CliError("a MODULE: prefix needs -p PID; for a BINARY give just the symbol pattern", 2)
    syms = _glob_filter(elf.functions, pattern)
    if not syms:
        if pattern is None:
            raise CliError(f"{path}: no function symbols", 1)
        import difflib
        stem = re.sub(r"\[[^\]]*\]|[*?]", "", pattern)
        near = difflib.get_close_matches(stem, sorted({s.name for s in elf.functions}), n=5, cutoff=0.6)
        hint = f"; did you mean: {', '.join(near)}?" if near else ""
        raise CliError(f"no functions match {pattern!r} in {os.path.basename(path)}{hint}", 2)
    code = _Code(elf)
    name = os.path.basename(path)
    return [(name, f"{s.address:#x}", str(s.size), s.name, *verdict(code, s)) for s in syms]


def rows_for_pid(pid: int, pattern: str | None) -> list[tuple]:
    try:
        mods = modules(pid)
        spec = pattern if pattern else f"{main_module(pid, mods).path}:*"
        targets = resolve(pid, spec, mods)
    except SymbolError as e:
        raise CliError(str(e), 2) from None
    except ProcessLookupError:
        raise CliError(f"no process with PID {pid}", 1) from None
    except LookupError as e:
        raise CliError(str(e), 1) from None
    except PermissionError:
        raise CliError(f"not permitted to read the memory map of PID {pid}", 1) from None
    codes: dict[int, _Code] = {}
    out = []
    for t in targets:
        if t.symbol is None:
            continue
        code = codes.setdefault(id(t.module.elf), _Code(t.module.elf))
        sym = t.symbol
        out.append((t.module.name, f"{t.address:#x}", str(sym.size), sym.name + (f"+{t.offset:#x}" if t.offset else ""),
                    *verdict(code, sym)))
    return out


def run(args, command: list[str]) -> int:
    if command:
        raise CliError("list takes no command", 2)
    where = args.where
    if args.pid is not None:
        if len(where) > 1:
            raise CliError("with -p PID give at most one PATTERN", 2)
        rows = rows_for_pid(args.pid, where[0] if where else None)
    else:
        if not where:
            raise CliError("give -p PID or a BINARY to list (see pyprobes list --help)", 2)
        if len(where) > 2:
            raise CliError("give a BINARY and at most one PATTERN", 2)
        rows = rows_for_binary(where[0], where[1] if len(where) > 1 else None)
    if args.output:
        try:
            out = open(args.output, "w")
        except OSError as e:
            raise CliError(f"cannot write {args.output}: {e.strerror}", 2) from None
    else:
        out = sys.stdout
    widths = [max(len(r[i]) for r in rows + [HEADER]) for i in range(len(HEADER) - 1)]
    try:
        for r in [HEADER] + rows:
            cells = [r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].rjust(widths[2]),
                     r[3].ljust(widths[3]), r[4].ljust(widths[4]), r[5]]
            out.write("  ".join(cells).rstrip() + "\n")
        out.flush()
    except BrokenPipeError:
        # `pyprobes list ... | head`: the reader is gone, which is fine.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        if out is not sys.stdout:
            out.close()
    return 0
