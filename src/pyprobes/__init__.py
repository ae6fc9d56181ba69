"""pyprobes: the Linux kernel's kprobes design, for ordinary running x86-64 processes.

Everything the command line does goes through these names (the CLI imports nothing else).
Each is imported on first use (PEP 562): `pyprobes --help`, and a Ctrl-C while the command
line starts, import none of the engine, iced-x86 or the ptrace binding.
"""
from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

_HOME = {  # where each public name lives
    "DEFAULT_BUSY_WAIT_US": ".engine", "Frame": ".engine", "FunctionPlan": ".engine", "PendingProbe": ".engine",
    "Probe": ".engine", "ProbeError": ".engine", "Process": ".engine", "Record": ".engine", "ReturnProbe": ".engine",
    "ReturnRecord": ".engine",
    "attach": ".engine", "LatencyHistogram": ".engine.histogram",
    "functions_of_binary": ".engine", "functions_of_process": ".engine", "spawn": ".engine",
    "PyprobesError": ".errors",
    "ElfError": ".symbols", "FunctionInfo": ".symbols", "NoDebugInfo": ".symbols", "debug_info_for": ".symbols", "SymbolError": ".symbols", "Target": ".symbols", "parse_spec": ".symbols",
    "ProcessExited": ".tracee",
    "usdt_probes_of_binary": ".symbols.usdt", "usdt_probes_of_process": ".symbols.usdt",
}
__all__ = sorted(_HOME) + ["__version__"]


def __getattr__(name: str):
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'pyprobes' has no attribute {name!r}")
    value = getattr(import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
