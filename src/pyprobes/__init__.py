"""pyprobes: the Linux kernel's kprobes design, for ordinary running x86-64 processes."""
from .errors import PyprobesError

__version__ = "0.1.0"
__all__ = ["PyprobesError", "__version__"]
