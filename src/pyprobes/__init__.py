"""pyprobes: the Linux kernel's kprobes design, for ordinary running x86-64 processes.

Everything the command line does goes through these names (the CLI imports nothing else).
"""
from .engine import (DEFAULT_BUSY_WAIT_US, FunctionPlan, PendingProbe, Probe, ProbeError, Process, ReturnProbe,
                     attach, functions_of_binary, functions_of_process, spawn)
from .errors import PyprobesError
from .symbols import ElfError, SymbolError, Target, parse_spec
from .tracee import ProcessExited

__version__ = "0.1.0"
__all__ = ["DEFAULT_BUSY_WAIT_US", "ElfError", "FunctionPlan", "PendingProbe", "Probe", "ProbeError", "Process",
           "ProcessExited", "PyprobesError", "ReturnProbe", "SymbolError", "Target", "attach", "functions_of_binary",
           "functions_of_process", "parse_spec", "spawn", "__version__"]
