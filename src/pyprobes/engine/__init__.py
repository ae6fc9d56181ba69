"""The probe engine: probes, probe points, the hit path, loader events, and the Process API built on them."""
from .engine import Engine
from .loader import LoaderEvents
from .probe import Probe, ProbeError, ProbePoint
from .process import Process, attach, spawn

__all__ = ["Engine", "LoaderEvents", "Probe", "ProbeError", "ProbePoint", "Process", "attach", "spawn"]
