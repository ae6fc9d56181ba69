"""`pyprobes count`: hits per probe, as a table at the end (and every INTERVAL seconds)."""
from __future__ import annotations

import argparse

from .output import Report, count_table
from .session import Session

HELP = "count hits per probe"
EPILOG = """\
examples:
  pyprobes count main 'libc:puts' -- ./prog arg     count until ./prog exits; exit with its status
  pyprobes count -p 1234 -d 5 'libc:malloc'         count in PID 1234 for 5 s, then detach
  pyprobes count -p 1234 -i 1 'libc:str*'           a table every second until Ctrl-C
  pyprobes count --json -o counts.json f -- ./prog  one JSON object in counts.json

PROBE is [MODULE:]SYMBOL[+OFFSET] or MODULE:0xADDR; SYMBOL may be a glob ('libc:str*').
The report goes to stderr (or -o FILE); the command's own output is untouched.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("count", help=HELP, usage='%(prog)s [-p PID] [-d SECONDS] [-i INTERVAL] [--json] [-o FILE] [-v] PROBE... [-- COMMAND ARGS...]', description=HELP.capitalize() + ".", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-p", "--pid", type=int, help="attach to this running process")
    p.add_argument("-d", "--duration", type=float, metavar="SECONDS", help="stop after SECONDS")
    p.add_argument("-i", "--interval", type=float, metavar="INTERVAL",
                   help="also print the table every INTERVAL seconds")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (one per interval with -i) instead of a table")
    p.add_argument("-o", "--output", metavar="FILE", help="write the report to FILE instead of stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="show what was resolved and placed")
    p.add_argument("probes", nargs="+", metavar="PROBE", help="where to count")
    p.set_defaults(func=run)


def rows(session: Session) -> list[dict]:
    return [{"probe": p.name, "module": p.target.module.name if p.target else None,
             "address": f"{p.address:#x}", "hits": p.hits, "missed": p.missed, "mode": p.mode}
            for p in session.probes]


def show(session: Session, report: Report, args, final: bool, exit_code=None) -> None:
    if args.json:
        report.json({"probes": rows(session), "duration_s": round(session.duration, 6),
                     "exit_code": exit_code, **({} if final else {"final": False})})
    else:
        title = f"pyprobes count: {session.duration:.3f} s{'' if final else ' so far'}"
        report.table(count_table(rows(session), title=title))


def run(args, command: list[str], on_done=None) -> int:
    for name in ("duration", "interval"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            from .output import CliError
            raise CliError(f"--{name} must be a positive number of seconds", 2)
    Session.check_specs(args.probes)
    report = Report(args.output)
    session = Session(args.pid, command, report, args.verbose)
    try:
        session.open()
        session.place(args.probes)
        session.install_signals()
        session.go()
        session.run(args.duration, args.interval,
                    tick=lambda: show(session, report, args, final=False))
    finally:
        session.close()
        session.restore_signals()
        report.flush()
    status = session.exit_status()
    exit_code = None
    if session.spawned and session.child_status is not None:
        exit_code = session.child_status
    show(session, report, args, final=True, exit_code=exit_code)
    if on_done is not None:
        totals: dict[str, int] = {}
        for p in session.probes:
            name = p.target.symbol.name if p.target and p.target.symbol else p.name
            totals[name] = totals.get(name, 0) + p.hits
        on_done(totals)
    report.close()
    return status
