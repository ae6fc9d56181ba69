"""`pyprobes count`: hits per probe, as a table at the end (and every INTERVAL seconds)."""
from __future__ import annotations

import argparse
from collections import Counter

from pyprobes import LatencyHistogram, ReturnProbe

from .live import LiveCounts, LiveRow, is_live_terminal
from .output import MANY_ROWS, CliError, Report, count_table, histogram_text, note
from .session import MAX_SECONDS, Session, add_speed_options
from .stacks import StackCounts

HELP = "count hits per probe"
EPILOG = """\
examples:
  pyprobes count main 'libc:puts' -- ./prog arg     count until ./prog exits; exit with its status
  pyprobes count -p 1234 -d 5 'libc:malloc'         count in PID 1234 for 5 s, then detach
  pyprobes count -p 1234 -i 1 'libc:str*'           every second until Ctrl-C: a live view in a terminal
  pyprobes count --json -o counts.json f -- ./prog  one JSON object in counts.json
  pyprobes count 'libplug:*' -- ./prog              a library ./prog dlopens later: pending until then
  pyprobes count --latency 'libc:malloc%return' -- ./prog   returns, with a log2 latency histogram
  pyprobes count --no-optimize 'libc:malloc' -- ./prog   breakpoints only: a stop per hit
  pyprobes count --stacks 'libc:malloc' -- ./prog   the distinct user stacks of each probe's hits
  pyprobes count --folded -o out.folded f -- ./prog flame-graph folded stacks: root;...;leaf COUNT

PROBE is [MODULE:]SYMBOL[+OFFSET] or MODULE:0xADDR; SYMBOL may be a glob ('libc:str*');
SYMBOL%return counts returns. A probe is jump-optimised where the function's entry allows it
(mode "optimized", "return optimized": counted inside the process, no stop per call, a return's
latency with pyprobes' own measured cost taken out; `pyprobes list` says where and why not);
the others are breakpoints (boosted, emulated or stepped, "return": two stops per call), as is
every probe with --no-optimize. A PROBE in a library that is not loaded
yet is pending (mode "pending") until the program loads it; probes of a library it unloads
show mode "unloaded".
--stacks and --folded unwind each hit's stack with the modules' .eh_frame, so every probe
is a breakpoint (mode "... +stack"); --folded writes only the folded stacks, whose counts
add up to the hits.
With -i on a terminal the report is a live view: hits, the rate over the last interval and,
with --latency, that interval's latency p50/p99/max; the final table follows when it ends.
The report goes to stderr (or -o FILE); the command's own output is untouched.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("count", help=HELP, usage='%(prog)s [-p PID] [-d SECONDS] [-i INTERVAL] [--latency] [--json] [-o FILE] [-v] [--no-optimize] [--stacks] [--folded] [--same-cpu] [--busy-wait US] PROBE... [-- COMMAND ARGS...]', description=HELP.capitalize() + ".", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-p", "--pid", type=int, help="attach to this running process")
    p.add_argument("-d", "--duration", type=float, metavar="SECONDS", help="stop after SECONDS")
    p.add_argument("-i", "--interval", type=float, metavar="INTERVAL",
                   help="also report every INTERVAL seconds: in a terminal a live view of hits, rates and "
                        "latency percentiles, redrawn in place; otherwise (--json, -o FILE, a pipe) the table")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (one per interval with -i) instead of a table")
    p.add_argument("--latency", "--hist", dest="latency", action="store_true",
                   help="a log2 histogram of the latency of each %%return probe, call to return (ns)")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write the report to FILE instead of stderr (notes and errors stay on stderr, so FILE "
                        "holds the report alone: with --json, one JSON object per line)")
    p.add_argument("-v", "--verbose", action="store_true", help="show what was resolved and placed")
    p.add_argument("--no-optimize", dest="optimize", action="store_false",
                   help="breakpoints only: no entry probe is jump-optimised (by default one is "
                        "wherever its function's entry allows it: mode 'optimized', no stop per hit)")
    p.add_argument("--optimize", dest="optimize", action="store_true",
                   help="the default, accepted for compatibility")
    p.add_argument("--stacks", action="store_true",
                   help="count the distinct user stacks of each probe's hits (unwound with .eh_frame)")
    p.add_argument("--folded", action="store_true",
                   help="write flame-graph folded stacks (root;...;leaf COUNT) instead of the table")
    add_speed_options(p)
    p.add_argument("probes", nargs="+", metavar="PROBE", help="where to count")
    p.set_defaults(func=run)


def rows(session: Session, hists: dict[str, LatencyHistogram] | None = None) -> list[dict]:
    """One row per function probed: its hits summed over every load of its module (and every
    image after an exec); a PROBE not armed yet is one row with mode "pending" and no address.

    A function is its module and link-time address, not its name: two `static helper()` of two
    source files are two rows, each named `helper@0xLINKADDR` so the user can tell them apart."""
    out = named_rows(session)
    for row, shown_name in out:
        if hists is not None:
            hist = hists.get(row["probe"])
            if hist is not None:
                row["latency_ns"] = hist.as_json()
        row["probe"] = shown_name
    return [row for row, _ in out]


def live_rows(session: Session, hists: dict[str, LatencyHistogram] | None, stacks: bool) -> list[LiveRow]:
    """The rows of the live view: as rows(), with each %return probe's latency histogram."""
    return [LiveRow(shown_name, stack_mode(row["mode"]) if stacks else row["mode"], row["hits"], row["missed"],
                    hists.get(row["probe"]) if hists is not None else None)
            for row, shown_name in named_rows(session)]


def return_mode(p: ReturnProbe) -> str:
    """A return probe's mode in the table: "return", or "return optimized" when its calls are
    followed inside the process (no stop)."""
    return "return optimized" if p.mode == "optimized" else "return"


class ReturnHistograms:
    """Each %return probe's latency histogram by name, read from its probes when asked: an
    in-process return probe keeps its buckets in the tracee (merged over every load)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, name: str) -> LatencyHistogram | None:
        found = [p.histogram for pp in self.session.pendings for p in pp.history
                 if isinstance(p, ReturnProbe) and p.name == name and hasattr(p, "histogram")]
        if not found:
            return None
        total = found[0]
        for hist in found[1:]:
            total = total.merge(hist)
        return total


def stack_mode(mode: str) -> str:
    """A probe's mode with --stacks: a stack needs a stop, so a breakpoint, never optimised."""
    return mode if mode in ("pending", "unloaded", "return", "return optimized") else mode + " +stack"


def named_rows(session: Session) -> list[tuple[dict, str]]:
    """rows() before latency: (row, its name as shown), the row still under the probe's name."""
    out: list[tuple[dict, str]] = []
    for pp in session.pendings:
        if not pp.history:
            out.append(({"probe": pp.spec, "module": pp.module, "address": None, "hits": 0,
                         "missed": 0, "mode": pp.state}, pp.spec))
            continue
        live = {id(p) for p in pp.probes}
        group: dict[tuple[str, str, int], dict] = {}
        for p in pp.history:
            is_live = id(p) in live
            mode = (return_mode(p) if isinstance(p, ReturnProbe) else p.mode) if is_live else "unloaded"
            module = p.target.module
            key = (p.name, module.path, module.to_link(p.address))
            row = group.get(key)
            if row is None:
                row = group[key] = {"probe": p.name, "module": module.name,
                                    "address": f"{p.address:#x}", "hits": 0, "missed": 0, "mode": mode}
            elif is_live:
                row.update(address=f"{p.address:#x}", mode=mode)
            row["hits"] += p.hits
            row["missed"] += p.missed
        names = Counter(name for name, _, _ in group)
        out.extend((row, f"{name}@{link:#x}" if names[name] > 1 else name)
                   for (name, _, link), row in group.items())
    return out


def show(session: Session, report: Report, args, final: bool, exit_code=None,
         hists: dict[str, LatencyHistogram] | None = None, stacks: StackCounts | None = None) -> None:
    if stacks is not None and getattr(args, "folded", False):
        if final:
            report.write(stacks.folded())
            report.flush()
        return
    table_rows = rows(session, hists)
    if stacks is not None:
        for row in table_rows:
            row["mode"] = stack_mode(row["mode"])
            row["stacks"] = stacks.as_json(row["probe"])
    if args.json:
        report.json({"probes": table_rows, "duration_s": round(session.duration, 6),
                     "exit_code": exit_code, **({} if final else {"final": False})})
        return
    title = f"pyprobes count: {session.duration:.3f} s{'' if final else ' so far'}"
    shown = table_rows
    if len(table_rows) > MANY_ROWS:
        # 'libc:*' places thousands: the ones never hit would bury the others (and take
        # seconds to draw). --json keeps every row.
        shown = [r for r in table_rows if r["hits"] or r["missed"]]
    # The title is a line of its own: as the table's title, rich pads it to the table's width.
    report.line(title)
    report.table(count_table(shown))
    if len(shown) < len(table_rows):
        report.line(f"{len(table_rows) - len(shown)} of {len(table_rows)} probes had no hits and are "
                    "not shown (--json lists every probe)")
    if hists:
        for row in table_rows:
            hist = hists.get(row["probe"])
            if hist is not None and hist.count:
                report.write(histogram_text(f"{row['probe']} latency (ns)", hist))
        report.flush()
    if stacks is not None and final:
        report.write(stacks.text())
        report.flush()


def run(args, command: list[str], on_done=None) -> int:
    for name in ("duration", "interval"):
        value = getattr(args, name)
        if value is not None and not 0 < value < MAX_SECONDS:  # also refuses nan and inf
            raise CliError(f"--{name} must be a positive number of seconds", 2)
    Session.check_specs(args.probes)
    latency = getattr(args, "latency", False)
    hists: dict[str, LatencyHistogram] | ReturnHistograms | None = None
    ret_for = None
    stacks = StackCounts() if getattr(args, "stacks", False) or getattr(args, "folded", False) else None
    optimize = getattr(args, "optimize", True) and stacks is None
    # Return probes without a handler follow their calls inside the process (no stop) where
    # their entry can be jump-optimised; the latency histogram then lives in the tracee.
    return_action = ("hist" if latency else "count") if optimize else None
    if latency:
        if not any(spec.strip().endswith("%return") for spec in args.probes):
            raise CliError("--latency needs a return probe (SYMBOL%return)", 2)
    if latency and return_action is None:  # followed with stops: each latency added at its return
        hists = {}

        def ret_for(target):
            hist = hists.setdefault(target.name + "%return", LatencyHistogram())
            add = hist.add

            def on_return(tid, retval, elapsed_ns, data):
                add(elapsed_ns)
            return on_return
    report = Report(args.output)
    session = Session(args.pid, command, report, args.verbose, same_cpu=args.same_cpu, busy_wait_us=args.busy_wait)
    if latency and return_action is not None:
        hists = ReturnHistograms(session)  # kept in the tracee, read when shown
    # Ctrl-C, SIGTERM and SIGHUP are ours from the start: one that comes while the probes go
    # in ends the session right after, cleanly (never a KeyboardInterrupt mid-placement).
    session.install_signals()
    try:
        session.open()
        session.place(args.probes, pre_for=stacks.pre_for(session) if stacks else None, ret_for=ret_for,
                      action="count" if optimize else None, return_action=return_action)
        session.go()
        if args.interval is not None and not args.json and not getattr(args, "folded", False) \
                and is_live_terminal(report):
            with LiveCounts(report, lambda: live_rows(session, hists, stacks is not None),
                            lambda: session.duration) as view:
                session.run(args.duration, args.interval, tick=view.tick)
        else:
            session.run(args.duration, args.interval,
                        tick=lambda: show(session, report, args, final=False, hists=hists, stacks=stacks))
    finally:
        session.close()
        session.restore_signals()
        report.flush()
    status = session.exit_status()
    if args.verbose:
        for p in session.probes:
            if not isinstance(p, ReturnProbe) and p.not_optimized:
                note(f"{p.name}: not optimized ({p.mode}): {p.not_optimized}")
    exit_code = None
    if session.spawned and session.child_status is not None:
        exit_code = session.child_status
    show(session, report, args, final=True, exit_code=exit_code, hists=hists, stacks=stacks)
    if on_done is not None:
        totals: dict[str, int] = {}
        for p in session.probes:
            name = p.target.symbol.name if p.target and p.target.symbol else p.name
            totals[name] = totals.get(name, 0) + p.hits
        on_done(totals)
    report.close()
    return status
