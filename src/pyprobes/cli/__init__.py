"""The command line: `pyprobes list | trace | count | demo`.

One module per command (list.py, trace.py, count.py, demo.py), shared session handling in
session.py and output in output.py. This is the top layer: it imports everything below it and
nothing below imports it.
"""
from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  pyprobes demo                                  a 3-second tour on a built-in program
  pyprobes list ./prog                           functions, and how a probe on each would run
  pyprobes count main 'libc:puts' -- ./prog      hits per probe while ./prog runs
  pyprobes trace -p 1234 'libc:open*'            each hit, with arguments, until Ctrl-C

Run `pyprobes COMMAND --help` for each command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    from pyprobes import __version__

    from . import count, demo, list as list_cmd, trace
    parser = argparse.ArgumentParser(
        prog="pyprobes", description="kprobes for ordinary Linux x86-64 processes.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pyprobes {__version__}")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    list_cmd.add_parser(sub)
    trace.add_parser(sub)
    count.add_parser(sub)
    demo.add_parser(sub)
    return parser


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """Everything after the first `--` is the command to run, passed on untouched."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except KeyboardInterrupt:  # Ctrl-C before a command's own handlers are in: while importing, say
        print("pyprobes: interrupted", file=sys.stderr)
        return 130


def run(argv: list[str] | None = None) -> int:
    """The command line, with the commands' imports (main() catches a Ctrl-C among them too)."""
    from pyprobes import PyprobesError

    from .output import CliError, error

    argv = [*(sys.argv[1:] if argv is None else argv)]
    ours, command = split_command(argv)
    parser = build_parser()
    args = parser.parse_args(ours)
    if args.cmd is None:
        parser.print_help(sys.stderr)
        return 2
    if "--" in argv and not command and args.cmd in ("trace", "count"):
        error("no command after --")
        return 2
    try:
        return args.func(args, command)
    except CliError as e:
        error(str(e))
        return e.status
    except PyprobesError as e:
        error(str(e))
        return 1
    except BrokenPipeError:
        return 1
    except OSError as e:
        error(f"{e.strerror or e}" + (f": {e.filename}" if getattr(e, "filename", None) else ""))
        return 1
