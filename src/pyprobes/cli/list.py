"""`pyprobes list`: the functions that match, and what a probe at each entry would be."""
from __future__ import annotations

import argparse
import os
import shutil
import sys

from pyprobes import ElfError, FunctionPlan, SymbolError, functions_of_binary, functions_of_process
from pyprobes import usdt_probes_of_binary, usdt_probes_of_process

from .output import CliError

HELP = "list functions and how a probe at each would run"
EPILOG = """\
examples:
  pyprobes list ./prog                 every function of ./prog (link-time addresses)
  pyprobes list /lib/x86_64-linux-gnu/libc.so.6 'str*'
  pyprobes list -p 1234 'libc:mem*'    functions of a running process (runtime addresses)
  pyprobes list -p 1234                every function of its executable
  pyprobes list --usdt /usr/bin/python3.11   its USDT probes and their argument specs
  pyprobes list --usdt -p 1234 'python:*'    USDT probes of a running process's modules
  pyprobes list --args ./prog 'open*'  signatures from ./prog's debug info (DWARF)

PROBE column: boosted (one stop per hit), emulated (one stop, no slot), stepped (two
stops per hit), or refused with the reason. OPTIMIZED column: "yes" where `pyprobes count`
would jump-optimise the probe (mode "optimized": counted inside the process, no stop per hit),
else "no" and why; such a probe runs as its PROBE column says. Written to stdout (or -o FILE).
"""

HEADER = ("MODULE", "ADDRESS", "SIZE", "FUNCTION", "PROBE", "FIRST INSTRUCTION", "OPTIMIZED")


def add_parser(sub) -> None:
    p = sub.add_parser("list", help=HELP, usage='%(prog)s [-o FILE] (-p PID [PATTERN] | [--args] BINARY [PATTERN] | --usdt (-p PID [PATTERN] | BINARY [PATTERN]))', description=HELP.capitalize() + ".", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-p", "--pid", type=int, help="list functions of this running process")
    p.add_argument("-o", "--output", metavar="FILE", help="write the list to FILE instead of stdout")
    p.add_argument("--usdt", action="store_true",
                   help="list USDT probes (PROVIDER:NAME, semaphore, argument specs) instead of functions")
    p.add_argument("--args", action="store_true", help="BINARY's function signatures from its debug info (DWARF)")
    p.add_argument("where", nargs="*", metavar="BINARY|PATTERN",
                   help="BINARY [PATTERN] without -p; [PATTERN] with -p ([MODULE:]GLOB)")
    p.set_defaults(func=run)


def _binary_path(path: str) -> str:
    if not os.path.exists(path) and "/" not in path:
        found = shutil.which(path)
        if found:
            path = found
    if not os.path.exists(path):
        raise CliError(f"no such file: {path}", 2)
    return path


def rows_for_binary(path: str, pattern: str | None) -> list[FunctionPlan]:
    path = _binary_path(path)
    if pattern and ":" in pattern:
        raise CliError("a MODULE: prefix needs -p PID; for a BINARY give just the symbol pattern", 2)
    try:
        return functions_of_binary(path, pattern)
    except ElfError as e:
        # ElfError names the file and what is wrong with it: one line as it is.
        raise CliError(str(e), 2) from None
    except SymbolError as e:
        raise CliError(str(e), 2) from None
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror}", 1) from None


def rows_for_pid(pid: int, pattern: str | None) -> list[FunctionPlan]:
    try:
        return functions_of_process(pid, pattern)
    except SymbolError as e:
        raise CliError(str(e), 2) from None
    except ProcessLookupError:
        raise CliError(f"no process with PID {pid}", 1) from None
    except LookupError as e:
        raise CliError(str(e), 1) from None
    except PermissionError:
        raise CliError(f"not permitted to read the memory map of PID {pid}", 1) from None


USDT_HEADER = ("MODULE", "ADDRESS", "PROBE", "SEMAPHORE", "ARGUMENTS")


def usdt_rows(args) -> list[tuple[str, ...]]:
    where = args.where
    if len(where) > (1 if args.pid is not None else 2) or (args.pid is None and not where):
        raise CliError("give --usdt BINARY [PATTERN] or --usdt -p PID [PATTERN]", 2)
    try:
        if args.pid is not None:
            found = usdt_probes_of_process(args.pid, where[0] if where else None)
        else:
            found = usdt_probes_of_binary(_binary_path(where[0]), where[1] if len(where) > 1 else None)
    except (ElfError, SymbolError) as e:
        raise CliError(str(e), 2) from None
    except ProcessLookupError:
        raise CliError(f"no process with PID {args.pid}", 1) from None
    except OSError as e:
        raise CliError(f"cannot read: {e.strerror}", 1) from None
    return [(u.module, f"{u.address:#x}", f"{u.provider}:{u.name}",
             f"{u.semaphore:#x}" if u.semaphore else "-", u.args) for u in found]


def run(args, command: list[str]) -> int:
    if command:
        raise CliError("list takes no command", 2)
    if args.usdt:
        if args.args:
            raise CliError("--usdt and --args list different things: give one", 2)
        return _write(args, USDT_HEADER, usdt_rows(args))
    where = args.where
    if args.pid is not None:
        if args.args:
            raise CliError("--args lists a BINARY's signatures: give the BINARY, not -p PID", 2)
        if len(where) > 1:
            raise CliError("with -p PID give at most one PATTERN", 2)
        rows = rows_for_pid(args.pid, where[0] if where else None)
    else:
        if not where:
            raise CliError("give -p PID or a BINARY to list (see pyprobes list --help)", 2)
        if len(where) > 2:
            raise CliError("give a BINARY and at most one PATTERN", 2)
        if args.args:
            from .typed import list_signatures
            return list_signatures(_binary_path(where[0]), where[1] if len(where) > 1 else None, args.output)
        rows = rows_for_binary(where[0], where[1] if len(where) > 1 else None)
    rows = [(f.module, f"{f.address:#x}", str(f.size), f.name, f.probe, f.instruction,
             "yes" if f.optimized else f"no: {f.not_optimized}") for f in rows]
    return _write(args, HEADER, rows)


def _write(args, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> int:
    right = {"ADDRESS", "SIZE"}
    if args.output:
        try:
            out = open(args.output, "w")
        except OSError as e:
            raise CliError(f"cannot write {args.output}: {e.strerror}", 2) from None
    else:
        out = sys.stdout
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header) - 1)]
    try:
        for r in [header] + rows:
            cells = [(r[i].rjust(w) if header[i] in right else r[i].ljust(w)) for i, w in enumerate(widths)]
            out.write("  ".join(cells + [r[-1]]).rstrip() + "\n")
        out.flush()
    except BrokenPipeError:
        # `pyprobes list ... | head`: the reader is gone, which is fine.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        if out is not sys.stdout:
            out.close()
    return 0
