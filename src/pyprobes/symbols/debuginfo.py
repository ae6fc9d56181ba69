"""Finding an ELF file's separate debug file, as gdb does: by build-id, then by .gnu_debuglink.

Distributions strip .symtab (static functions and most internal ones) into a
debug file under DEFAULT_DEBUG_ROOT or next to the binary.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .elf import ElfFile

__all__ = ["DEFAULT_DEBUG_ROOT", "find_debug_file"]

DEFAULT_DEBUG_ROOT = "/usr/lib/debug"


def find_debug_file(elf: ElfFile, debug_root: str = DEFAULT_DEBUG_ROOT) -> Path | None:
    """The separate debug file of ELF, as gdb looks for it; None if there is none.

    Order: DEBUG_ROOT/.build-id/xx/rest.debug, then the .gnu_debuglink name
    next to the binary, in its .debug/ subdirectory, and under
    DEBUG_ROOT/<binary's directory>. A candidate must carry the same build-id
    (or, without one, match the debuglink CRC): a stale debug file would give
    wrong addresses.
    """
    own = Path(elf.path)
    try:
        own_id = own.stat()
    except OSError:
        own_id = None

    def is_self(p: Path) -> bool:
        try:
            st = p.stat()
        except OSError:
            return True
        return own_id is not None and (st.st_dev, st.st_ino) == (own_id.st_dev, own_id.st_ino)

    if elf.build_id and len(elf.build_id) > 2:
        p = Path(debug_root, ".build-id", elf.build_id[:2], elf.build_id[2:] + ".debug")
        if p.is_file() and not is_self(p) and _same_build_id(p, elf.build_id):
            return p
    if elf.debuglink:
        name, crc = elf.debuglink
        directory = Path(os.path.realpath(elf.path)).parent
        for p in (
            directory / name,
            directory / ".debug" / name,
            Path(debug_root + str(directory)) / name,
        ):
            if not p.is_file() or is_self(p):
                continue
            if elf.build_id:
                if _same_build_id(p, elf.build_id):
                    return p
            elif _file_crc(p) == crc:
                return p
    return None


def _file_crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _same_build_id(path: Path, build_id: str) -> bool:
    from .elf import ElfError, ElfFile  # elf imports this module (ElfFile.load_with_debug searches with it)

    try:
        return ElfFile.load(path).build_id == build_id
    except (ElfError, OSError):
        return False
