"""Named, typed arguments and return values from DWARF for `trace`: looked up once per probe,
formatted per hit. A module without debug info is said once, and its probes show raw registers."""
from __future__ import annotations

import json
from typing import Any

import pyprobes

from .output import CliError, note

CUT_MARK = "..."


class DebugInfoLookup:
    """function_info(target) with "no debug info" noted once per module."""

    def __init__(self, proc) -> None:
        self.proc = proc
        self.noted: set[str] = set()

    def function_of(self, target):
        try:
            return self.proc.function_info(target)
        except pyprobes.NoDebugInfo:
            module = target.module.path
            if module not in self.noted:
                self.noted.add(module)
                note(f"{target.module.name} has no debug info, so its arguments are raw registers: "
                     "install its debug symbols (the -dbg or -dbgsym package) or build it with -g")
            return None
        except pyprobes.PyprobesError as e:  # unreadable DWARF: raw registers
            note(f"{target.module.name}: cannot read its debug info ({e}); arguments are raw registers")
            return None


def text_value(value: Any, kind: str) -> str:
    """One value as trace's text line shows it."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if type(value).__name__ == "Unavailable":
            return f"<{value}>"
        return json.dumps(str(value), ensure_ascii=False) + (CUT_MARK if getattr(value, "cut", False) else "")
    if isinstance(value, float):
        return repr(value)
    if kind in ("pointer", "struct", "union", "array", "unknown"):
        return f"{value:#x}"
    if kind == "char" and 32 <= value < 127:
        return f"{value} {chr(value)!r}"
    return str(value)


def json_value(value: Any) -> Any:
    """One value as trace --json holds it: null where there is none, a cut string ends in "..."."""
    if isinstance(value, str):
        if type(value).__name__ == "Unavailable":
            return None
        return str(value) + (CUT_MARK if getattr(value, "cut", False) else "")
    return value


def call_text(function, values: list) -> str:
    return ", ".join(f"{p.name}={text_value(v, p.type.kind)}" for p, v in zip(function.parameters, values))


def call_json(function, values: list) -> dict:
    return {p.name: json_value(v) for p, v in zip(function.parameters, values)}


def list_signatures(path: str, pattern: str | None, output: str | None) -> int:
    """`pyprobes list --args BINARY [PATTERN]`: "ADDRESS  SIGNATURE" per function in its DWARF."""
    import fnmatch
    import sys

    if pattern and ":" in pattern:
        raise CliError("a MODULE: prefix needs -p PID; for a BINARY give just the symbol pattern", 2)
    try:
        functions = pyprobes.debug_info_for(path).functions()
    except pyprobes.NoDebugInfo:
        raise CliError(f"{path} has no debug info: install its debug symbols (the -dbg or -dbgsym "
                       "package) or build it with -g", 1) from None
    except pyprobes.PyprobesError as e:
        raise CliError(str(e), 1) from None
    if pattern:
        functions = [f for f in functions if fnmatch.fnmatchcase(f.name, pattern)]
        if not functions:
            raise CliError(f"no function matching {pattern!r} in the debug info of {path}", 1)
    lines = [f"{f.entry:#x}  {f.signature()}" for f in functions]
    try:
        out = open(output, "w") if output else sys.stdout
    except OSError as e:
        raise CliError(f"cannot write {output}: {e.strerror}", 2) from None
    try:
        out.write("".join(line + "\n" for line in lines))
        out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    return 0
