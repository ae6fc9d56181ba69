"""The probe engine: probes, probe points, the hit path, loader events, and the Process API built on them."""
from .engine import Engine
from .loader import LoaderEvents
from .pending import PendingProbe
from .plan import FunctionPlan, functions_of_binary, functions_of_process
from .probe import Probe, ProbeError, ProbePoint
from .process import DEFAULT_BUSY_WAIT_US, Process, attach, spawn
from .retprobe import ReturnProbe
from .ring import Record, ReturnRecord
from .stack import Frame

__all__ = ["DEFAULT_BUSY_WAIT_US", "Engine", "Frame", "FunctionPlan", "LoaderEvents", "PendingProbe", "Probe",
           "ProbeError", "ProbePoint", "Process", "Record", "ReturnProbe", "ReturnRecord", "attach", "functions_of_binary",
           "functions_of_process", "spawn"]
