"""x86-64 register names as the GNU assembler writes them, mapped onto the tracee's registers.

USDT argument specs ("-4@%edi", "8@-16(%rbp)") name registers in AT&T syntax at any
width; a handler's registers are the 64-bit fields of `user_regs_struct`.
"""
from __future__ import annotations

__all__ = ["INTEGER_ARGUMENTS", "FLOAT_ARGUMENTS", "RegisterPart", "register_part"]

# The System V AMD64 ABI: the first integer/pointer arguments, and how many go in xmm0...
INTEGER_ARGUMENTS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
FLOAT_ARGUMENTS = 8

# (64-bit name, 32-bit, 16-bit, low byte) for the registers with legacy names.
_LEGACY = (
    ("rax", "eax", "ax", "al"), ("rbx", "ebx", "bx", "bl"), ("rcx", "ecx", "cx", "cl"),
    ("rdx", "edx", "dx", "dl"), ("rsi", "esi", "si", "sil"), ("rdi", "edi", "di", "dil"),
    ("rbp", "ebp", "bp", "bpl"), ("rsp", "esp", "sp", "spl"),
)
_HIGH_BYTES = {"ah": "rax", "bh": "rbx", "ch": "rcx", "dh": "rdx"}


class RegisterPart(tuple):
    """(field, shift, width in bytes): the bits of `user_regs_struct.field` a name denotes."""

    __slots__ = ()

    def __new__(cls, field: str, shift: int, width: int) -> "RegisterPart":
        return super().__new__(cls, (field, shift, width))

    @property
    def field(self) -> str:
        return self[0]

    def value(self, regs: object) -> int:
        """The part's unsigned value in REGS."""
        return (getattr(regs, self[0]) >> self[1]) & ((1 << (8 * self[2])) - 1)


def _table() -> dict[str, RegisterPart]:
    table: dict[str, RegisterPart] = {"rip": RegisterPart("rip", 0, 8)}
    for names in _LEGACY:
        for name, width in zip(names, (8, 4, 2, 1)):
            table[name] = RegisterPart(names[0], 0, width)
    for high, field in _HIGH_BYTES.items():
        table[high] = RegisterPart(field, 8, 1)
    for n in range(8, 16):
        for suffix, width in (("", 8), ("d", 4), ("w", 2), ("b", 1)):
            table[f"r{n}{suffix}"] = RegisterPart(f"r{n}", 0, width)
    return table


_TABLE = _table()


def register_part(name: str) -> RegisterPart | None:
    """The register NAME (without '%', any case) denotes; None if it is not a general register."""
    return _TABLE.get(name.lower())
