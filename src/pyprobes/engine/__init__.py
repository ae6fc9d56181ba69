"""The probe engine: probes, probe points, the hit path, and the Process API built on them."""
from .engine import Engine
from .probe import Probe, ProbeError, ProbePoint
from .process import Process, attach, spawn

__all__ = ["Engine", "Probe", "ProbeError", "ProbePoint", "Process", "attach", "spawn"]
