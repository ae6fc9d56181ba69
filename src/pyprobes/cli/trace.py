"""`pyprobes trace`: one line per hit, with the first arguments by the System V convention."""
from __future__ import annotations

import argparse
import json
import time

from pyprobes import PyprobesError, ReturnRecord, parse_spec

from .output import CliError, Report
from .session import MAX_SECONDS, Session, add_speed_options
from .stacks import frame_lines, frames_of
from .typed import DebugInfoLookup, call_json, call_text, json_value, text_value

ARG_REGISTERS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
FLUSH_EVERY = 0.2  # seconds: lines are buffered, never held longer than this while hits come

HELP = "print one line per hit"
EPILOG = """\
examples:
  pyprobes trace 'libc:puts' -- ./prog             every puts, with its first 3 arguments
  pyprobes trace -p 1234 --args 2 'libc:open*'      in a running process, until Ctrl-C
  pyprobes trace --json -o hits.jsonl f -- ./prog   JSON Lines: {"time_s", "tid", "probe", "args"}
  pyprobes trace 'f' 'f%return' -- ./prog           calls and returns: return value and latency
  pyprobes trace --perfetto f.pftrace 'f%return' -- ./prog   each call of f a slice on a timeline
  pyprobes trace 'libplug:*' -- ./prog              a library ./prog dlopens later: pending until then
  pyprobes trace 'usdt:python:function__entry(str,str,int)' -- python3 x.py   a USDT probe, typed
  pyprobes trace 'work(int,str,double)' -- ./prog   a function's arguments typed (int uint hex str ptr double)
  pyprobes trace --no-optimize 'libc:malloc' -- ./prog   breakpoints only: a stop per hit
  pyprobes trace --stack 'libc:getpid' -- ./prog    each hit's user stack under its line

Each line: seconds since the probes went in, thread id, probe, arguments in hex
(rdi, rsi, rdx, rcx, r8, r9: integer and pointer arguments of the System V ABI).
A function whose module has debug info (DWARF, in the file or its -dbg package) shows
every parameter by name and type instead: open_file(path="/etc/hosts", flags=0), and
its JSON "args" is an object, {"path": "/etc/hosts", "flags": 0}; strings are read up
to 256 bytes ("..." marks a cut), <unavailable> where the value is optimised out;
--raw shows the registers as above (--args applies to them only).
A USDT probe (usdt:[MODULE:]PROVIDER:NAME) shows the arguments its note declares, as integers
of their size and sign. A type list, SPEC(T1,T2,...), shows each argument as its type says
(it wins over the debug info): int, uint, hex, ptr, str (a C string read from the program, at
most 256 bytes, "..." when cut) or double (xmm0, xmm1... for a function). In JSON, "args"
holds these typed values. Both need a stop to read memory: those probes are breakpoints.
A return (SYMBOL%return): the return value (rax) in hex, or typed by the debug info,
and the time since the call; JSON: {"time_s", "tid", "probe", "retval", "latency_ns"}.
Entry probes and returns are recorded inside the process where the function's entry allows it
(a ring in shared memory, read every 0.2 s: lines come in batches, in time order within each;
the latency has pyprobes' own measured cost taken out); "N records lost" at the end when the
ring was full at times (the program never waits for pyprobes). Typed arguments and typed return
values need a stop to read memory, so those probes are breakpoints, as is every probe with
--no-optimize.
--stack: the hit's frames (module:symbol+0xoff), unwound with the modules' .eh_frame;
JSON: "stack": [frames, innermost first]. A probe with a stack is a breakpoint.
--perfetto FILE: a Perfetto trace (open it at https://ui.perfetto.dev, "Open trace file"):
a track per thread (name and tid), a slice per call of a function with a %return probe (from
its entry to its return, its return value as an argument), an instant per hit of any other
probe (its arguments as above). The lines are not printed then, unless -o FILE asks for them.
The report goes to stderr (or -o FILE); the command's own output is untouched.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("trace", help=HELP, usage='%(prog)s [-p PID] [--args N] [--raw] [-d SECONDS] [--json] [-o FILE] [--perfetto FILE] [-v] [--stack] [--no-optimize] [--ring RECORDS] [--same-cpu] [--busy-wait US] PROBE... [-- COMMAND ARGS...]', description=HELP.capitalize() + ".", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-p", "--pid", type=int, help="attach to this running process")
    p.add_argument("--args", type=int, default=3, metavar="N",
                   help="show the first N arguments, 0 to 6 (default 3)")
    p.add_argument("--raw", action="store_true",
                   help="registers in hex (--args N of them) even where debug info names and types the arguments")
    p.add_argument("-d", "--duration", type=float, metavar="SECONDS", help="stop after SECONDS")
    p.add_argument("--json", action="store_true", help="write JSON Lines instead of text")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write the report to FILE instead of stderr (notes and errors stay on stderr, so FILE "
                        "holds the report alone: with --json, one JSON object per line)")
    p.add_argument("--perfetto", metavar="FILE",
                   help="write a Perfetto timeline to FILE (calls as slices, hits as instants) instead of "
                        "printing lines, which -o still writes")
    p.add_argument("-v", "--verbose", action="store_true", help="show what was resolved and placed")
    p.add_argument("--stack", action="store_true",
                   help="print each hit's user stack under its line (unwound with .eh_frame)")
    p.add_argument("--no-optimize", dest="optimize", action="store_false",
                   help="breakpoints only: a stop per hit (by default entry hits are recorded inside the "
                        "process, with no stop per hit, where the function's entry allows it)")
    p.add_argument("--optimize", dest="optimize", action="store_true", default=True,
                   help=argparse.SUPPRESS)  # the default; kept so that older command lines still work
    p.add_argument("--ring", type=int, metavar="RECORDS",
                   help="the ring's size in records, a power of two (default 8192)")
    add_speed_options(p)
    p.add_argument("probes", nargs="+", metavar="PROBE", help="where to trace")
    p.set_defaults(func=run)


def run(args, command: list[str]) -> int:
    if not 0 <= args.args <= len(ARG_REGISTERS):
        raise CliError(f"--args must be between 0 and {len(ARG_REGISTERS)}", 2)
    if args.duration is not None and not 0 < args.duration < MAX_SECONDS:  # also refuses nan and inf
        raise CliError("--duration must be a positive number of seconds", 2)
    Session.check_specs(args.probes)
    timeline = None
    if args.perfetto is not None:
        from .perfetto import Timeline
        timeline = Timeline(args.perfetto)
    lines = timeline is None or args.output is not None
    report = Report(args.output)
    session = Session(args.pid, command, report, args.verbose, same_cpu=args.same_cpu, busy_wait_us=args.busy_wait)
    registers = ARG_REGISTERS[: args.args]
    write = report.write
    last_flush = [time.monotonic()]
    as_json = args.json
    # Entries and returns are recorded in the process (returns with their value and latency,
    # entry and return jump-optimised), reach the report in batches and are printed in time
    # order; typed values are read at a stop, and their lines written there.
    with_stack = args.stack  # a stack needs a stop: every probe is a breakpoint then
    optimize = args.optimize and not with_stack
    lookup: list[DebugInfoLookup] = []  # made once the process exists

    def function_of(target):
        if not lookup:
            lookup.append(DebugInfoLookup(session.proc))
        return lookup[0].function_of(target)

    def emit(time_ns, tid, fields, text, frames=None, annotations=None):
        """One hit or return at TIME_NS (CLOCK_MONOTONIC): a JSON object (time, tid, FIELDS, the
        stack) or a text line (and the stack's lines under it); on the timeline, a call (FIELDS
        has its latency) or an instant, with ANNOTATIONS (by default FIELDS' args)."""
        if lines:
            # A record's TSC and the tracer's clock can disagree by up to a few hundred µs on a VM
            # (vCPUs' TSC offsets): a record from just after the start is shown at the start.
            seconds = max(time_ns / 1e9 - session.start, 0.0)
            if as_json:
                write(json.dumps({"time_s": round(seconds, 6), "tid": tid, **fields,
                                  **({"stack": list(frames)} if frames is not None else {})}) + "\n")
            else:
                write(f"{seconds:12.6f} {tid:>7} {text}\n")
                if frames is not None:
                    write(frame_lines(frames))
        if timeline is not None:
            if annotations is None:
                values = fields.get("args", ())
                annotations = values if isinstance(values, dict) else {f"arg{i}": v for i, v in enumerate(values)}
            if frames is not None:
                annotations = {**annotations, "stack": list(frames)}
            if "latency_ns" in fields:
                timeline.call(time_ns, fields["latency_ns"], tid, fields["probe"].removesuffix("%return"),
                              annotations)
            else:
                timeline.hit(time_ns, tid, fields["probe"], annotations)

    def flush():
        report.flush()
        if timeline is not None:
            timeline.flush()

    def flush_due(now):
        if now - last_flush[0] >= FLUSH_EVERY:
            last_flush[0] = now
            flush()

    def register_annotations(values):
        """The timeline's arguments of a probe shown as registers: named and in hex, as the line shows them."""
        return {r: f"{v:#x}" for r, v in zip(registers, values)} if timeline is not None else None

    def hex_text(values):
        return ", ".join(f"{v:#x}" for v in values)

    def entry_handler(name, read, json_args, text_args, annotate=lambda values: None):
        """A breakpoint probe's pre-handler: READ(tid, regs) gives its arguments, shown by
        JSON_ARGS / TEXT_ARGS (and ANNOTATE on the timeline, by default as JSON_ARGS)."""
        def on_hit(tid, regs):
            now = time.monotonic_ns()
            values = read(tid, regs)
            frames = frames_of(session, tid, regs) if with_stack else None
            emit(now, tid, {"probe": name, "args": json_args(values)},
                 f"{name}({text_args(values)})", frames, annotate(values))
            flush_due(now / 1e9)
        return on_hit

    def return_handler(name, value_of, json_value_of, text_value_of):
        def on_return(tid, retval, elapsed_ns, data):
            now = time.monotonic_ns()
            value = value_of(tid, retval)
            write_return(name, now, tid, json_value_of(value), elapsed_ns, text_value_of(value))
            flush_due(now / 1e9)
        return on_return

    def write_return(name, time_ns, tid, value, elapsed_ns, text=None):
        text = f"{value:#x}" if text is None else text
        emit(time_ns, tid, {"probe": name, "retval": value, "latency_ns": elapsed_ns},
             f"{name} = {text} ({elapsed_ns / 1000:.3f} us)", annotations={"retval": text})

    def typed_pre_for(target):
        """The pre-handler of a probe whose arguments are typed (by a USDT note, a type list or
        the debug info), which a stop reads; None for the others."""
        name = target.name
        if spec_typed(target):
            read = session.proc.args
            return entry_handler(name, lambda tid, regs: read(target, tid, regs), lambda values: values,
                                 lambda values: ", ".join(json.dumps(v) if isinstance(v, str) or v is None
                                                          else str(v) for v in values))
        function = None if args.raw else function_of(target)
        return None if function is None else typed_pre(name, function)

    def pre_for(target):
        return typed_pre_for(target) or entry_handler(
            target.name, lambda tid, regs: [getattr(regs, r) for r in registers], lambda values: values, hex_text,
            register_annotations)

    def write_record(record):
        probe = record.probe
        if type(record) is ReturnRecord:
            write_return(probe.name, record.time_ns, record.tid, record.retval, record.latency_ns)
            return
        name = probe.target.name if probe.target is not None else probe.name
        values = list(record.args[: len(registers)])
        emit(record.time_ns, record.tid, {"probe": name, "args": values}, f"{name}({hex_text(values)})",
             annotations=register_annotations(values))

    def show_records():
        if session.proc is not None:
            for record in sorted(session.proc.records(), key=lambda r: r.time_ns):
                write_record(record)
        flush()

    def spec_typed(target):
        """A USDT probe (arguments from its note) or SPEC(T,...) (a type list types them)."""
        return target.usdt is not None or parse_spec(target.spec).types is not None

    def typed_pre(name, function):
        read = session.proc.read_arguments
        return entry_handler(name, lambda tid, regs: read(tid, regs, function),
                             lambda values: call_json(function, values), lambda values: call_text(function, values))

    def ret_for(target):
        name = target.name + "%return"
        if timeline is not None:
            timeline.returned.add(target.name)  # its entry probe's hits are the call's slice
        function = None if args.raw else function_of(target)
        if function is not None and function.return_type is not None:
            type_, typed = function.return_type, session.proc.typed_return
            return return_handler(name, lambda tid, retval: typed(tid, retval, type_), json_value,
                                  lambda value: text_value(value, type_.kind))
        if optimize:
            return None  # recorded in the process: a ReturnRecord, written by write_record
        return return_handler(name, lambda tid, retval: int(retval), lambda value: value,
                              lambda value: f"{value:#x}")

    session.install_signals()  # from the start: see count.run
    try:
        session.open()
        if timeline is not None:
            timeline.default_pid = session.proc.pid
            timeline.name_of = session.proc.thread_name
        if optimize and args.ring is not None:
            try:
                session.proc.ring_capacity = args.ring
            except PyprobesError as e:
                raise CliError(str(e), 2) from None
        if optimize:
            # Recorded in the process, unless the arguments are typed: a stop reads them.
            session.place(args.probes, typed_pre_for, ret_for, action="record", return_action="record")
        else:
            session.place(args.probes, pre_for, ret_for)
        if lines and not as_json:
            report.line(f"{'TIME(s)':>12} {'TID':>7} PROBE(ARGS)")
        session.go()
        session.run(args.duration, FLUSH_EVERY, tick=show_records if optimize else flush)
    finally:
        session.close()
        session.restore_signals()
        if optimize:
            show_records()
        report.flush()
        if timeline is not None:
            timeline.close()
    if optimize and session.proc is not None and session.proc.lost_records:
        from .output import note
        note(f"{session.proc.lost_records} records lost (the ring was full)")
    missed = sum(p.missed for p in session.probes)
    if missed:
        from .output import note
        note(f"{missed} hits could not be reported")
    if timeline is not None:
        from .output import note
        note(f"{timeline.calls} calls and {timeline.hits} hits written to {timeline.path}")
    status = session.exit_status()
    report.close()
    return status
