"""What a module's code reaches: every address a direct branch, a RIP-relative operand or a
recognised switch table's entry anywhere in its executable segments takes (link-time), swept
once per file. A jump-optimised probe's patched bytes must hold none past their first byte:
the optimizer (optimizer.py) and `pyprobes list` (plan.py) ask the same question here."""
from __future__ import annotations

from bisect import bisect_right

from ..symbols import CodeReader, ElfFile
from ..x86 import reached_addresses

_PF_X = 1  # an ELF segment's executable flag


class ModuleSweep:
    """ELF's code (read a segment at a time, each once) and, swept when first asked, what it reaches."""

    def __init__(self, elf: ElfFile) -> None:
        self.code = CodeReader(elf)
        self._reached: list[int] | None = None

    @property
    def elf(self) -> ElfFile:
        return self.code.elf

    def reached_inside(self, start: int, end: int) -> int | None:
        """The first link-time address reached in (START, END), or None."""
        if self._reached is None:
            read = self.code.read
            self._reached = sorted(a for seg in self.elf.segments if seg.flags & _PF_X
                                   for a in reached_addresses(read(seg.vaddr, seg.filesz), seg.vaddr, read))
        at = bisect_right(self._reached, start)
        return self._reached[at] if at < len(self._reached) and self._reached[at] < end else None
