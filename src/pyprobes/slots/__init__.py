"""Instruction slots in the tracee: allocation, dirty/clean frees, garbage collection."""
from .cache import (
    PAGE_SIZE,
    REACH,
    SLOT_SIZE,
    SLOTS_PER_PAGE,
    Slot,
    SlotCache,
    SlotHost,
    SlotMapError,
    in_reach,
)

__all__ = [
    "PAGE_SIZE",
    "REACH",
    "SLOT_SIZE",
    "SLOTS_PER_PAGE",
    "Slot",
    "SlotCache",
    "SlotHost",
    "SlotMapError",
    "in_reach",
]
