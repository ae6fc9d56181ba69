"""pyprobes: the Linux kernel's kprobes design, for ordinary running x86-64 processes."""
from .engine import Probe, ProbeError, Process, attach, spawn
from .errors import PyprobesError

__version__ = "0.1.0"
__all__ = ["Probe", "ProbeError", "Process", "PyprobesError", "attach", "spawn", "__version__"]
