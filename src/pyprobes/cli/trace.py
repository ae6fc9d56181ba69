"""`pyprobes trace`: one line per hit, with the first arguments by the System V convention."""
from __future__ import annotations

import argparse
import json
import time

from pyprobes import parse_spec

from .output import CliError, Report
from .session import MAX_SECONDS, Session, add_speed_options

ARG_REGISTERS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
FLUSH_EVERY = 0.2  # seconds: lines are buffered, never held longer than this while hits come

HELP = "print one line per hit"
EPILOG = """\
examples:
  pyprobes trace 'libc:puts' -- ./prog             every puts, with its first 3 arguments
  pyprobes trace -p 1234 --args 2 'libc:open*'      in a running process, until Ctrl-C
  pyprobes trace --json -o hits.jsonl f -- ./prog   JSON Lines: {"time_s", "tid", "probe", "args"}
  pyprobes trace 'f' 'f%return' -- ./prog           calls and returns: return value and latency
  pyprobes trace 'libplug:*' -- ./prog              a library ./prog dlopens later: pending until then
  pyprobes trace 'usdt:python:function__entry(str,str,int)' -- python3 x.py   a USDT probe, typed
  pyprobes trace 'work(int,str,double)' -- ./prog   a function's arguments typed (int uint hex str ptr double)

Each line: seconds since the probes went in, thread id, probe, arguments in hex
(rdi, rsi, rdx, rcx, r8, r9: integer and pointer arguments of the System V ABI).
A USDT probe (usdt:[MODULE:]PROVIDER:NAME) shows the arguments its note declares, as integers
of their size and sign. A type list, SPEC(T1,T2,...), shows each argument as its type says:
int, uint, hex, ptr, str (a C string read from the program, at most 256 bytes, "..." when cut)
or double (xmm0, xmm1... for a function). In JSON, "args" holds these typed values.
A return (SYMBOL%return): the return value (rax) in hex and the time since the call;
JSON: {"time_s", "tid", "probe", "retval", "latency_ns"}.
The report goes to stderr (or -o FILE); the command's own output is untouched.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("trace", help=HELP, usage='%(prog)s [-p PID] [--args N] [-d SECONDS] [--json] [-o FILE] [-v] [--same-cpu] [--busy-wait US] PROBE... [-- COMMAND ARGS...]', description=HELP.capitalize() + ".", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-p", "--pid", type=int, help="attach to this running process")
    p.add_argument("--args", type=int, default=3, metavar="N",
                   help="show the first N arguments, 0 to 6 (default 3)")
    p.add_argument("-d", "--duration", type=float, metavar="SECONDS", help="stop after SECONDS")
    p.add_argument("--json", action="store_true", help="write JSON Lines instead of text")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write the report to FILE instead of stderr (notes and errors stay on stderr, so FILE "
                        "holds the report alone: with --json, one JSON object per line)")
    p.add_argument("-v", "--verbose", action="store_true", help="show what was resolved and placed")
    add_speed_options(p)
    p.add_argument("probes", nargs="+", metavar="PROBE", help="where to trace")
    p.set_defaults(func=run)


def run(args, command: list[str]) -> int:
    if not 0 <= args.args <= len(ARG_REGISTERS):
        raise CliError(f"--args must be between 0 and {len(ARG_REGISTERS)}", 2)
    if args.duration is not None and not 0 < args.duration < MAX_SECONDS:  # also refuses nan and inf
        raise CliError("--duration must be a positive number of seconds", 2)
    Session.check_specs(args.probes)
    report = Report(args.output)
    session = Session(args.pid, command, report, args.verbose, same_cpu=args.same_cpu, busy_wait_us=args.busy_wait)
    registers = ARG_REGISTERS[: args.args]
    write = report.write
    last_flush = [time.monotonic()]
    as_json = args.json

    def pre_for(target):
        name = target.name
        # A USDT probe's arguments come from its note; a type list (SPEC(T,...)) types them.
        typed = target.usdt is not None or parse_spec(target.spec).types is not None
        proc = session.proc

        def on_hit(tid, regs):
            now = time.monotonic()
            if typed:
                values = proc.args(target, tid, regs)
                shown = ", ".join(json.dumps(v) if isinstance(v, str) or v is None else str(v) for v in values)
            else:
                values = [getattr(regs, r) for r in registers]
                shown = ", ".join(f"{v:#x}" for v in values)
            if as_json:
                write(json.dumps({"time_s": round(now - session.start, 6), "tid": tid,
                                  "probe": name, "args": values}) + "\n")
            else:
                write(f"{now - session.start:12.6f} {tid:>7} {name}({shown})\n")
            if now - last_flush[0] >= FLUSH_EVERY:
                last_flush[0] = now
                report.flush()
        return on_hit

    def ret_for(target):
        name = target.name + "%return"

        def on_return(tid, retval, elapsed_ns, data):
            now = time.monotonic()
            if as_json:
                write(json.dumps({"time_s": round(now - session.start, 6), "tid": tid, "probe": name,
                                  "retval": int(retval), "latency_ns": elapsed_ns}) + "\n")
            else:
                write(f"{now - session.start:12.6f} {tid:>7} {name} = {int(retval):#x}"
                      f" ({elapsed_ns / 1000:.3f} us)\n")
            if now - last_flush[0] >= FLUSH_EVERY:
                last_flush[0] = now
                report.flush()
        return on_return

    session.install_signals()  # from the start: see count.run
    try:
        session.open()
        session.place(args.probes, pre_for, ret_for)
        if not as_json:
            report.line(f"{'TIME(s)':>12} {'TID':>7} PROBE(ARGS)")
        session.go()
        session.run(args.duration, FLUSH_EVERY, tick=report.flush)
    finally:
        session.close()
        session.restore_signals()
        report.flush()
    missed = sum(p.missed for p in session.probes)
    if missed:
        from .output import note
        note(f"{missed} hits could not be reported")
    status = session.exit_status()
    report.close()
    return status
