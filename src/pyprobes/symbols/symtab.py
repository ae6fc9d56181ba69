"""ELF symbol tables (.symtab, .dynsym) read in bulk, and the Symbol each function becomes.

Tables are read with ``struct.iter_unpack``: pyelftools' ``iter_symbols()``
builds one object per symbol and costs 80 ms for libc (0.5 s for libpython),
which a user pays on every attach. Also here: which of several names for one
address a user recognises soonest (``preference``).
"""
from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = [
    "SYM64",
    "Symbol",
    "hidden_versions",
    "lookup_order",
    "object_value",
    "preference",
    "read_functions",
]

# Elf64_Sym: st_name, st_info, st_other, st_shndx, st_value, st_size.
SYM64 = struct.Struct("<IBBHQQ")
_STT_OBJECT = 1
_STT_FUNC = 2
_STT_GNU_IFUNC = 10
_SHN_UNDEF = 0
_BINDINGS = {0: "local", 1: "global", 2: "weak", 10: "global"}  # 10 = STB_GNU_UNIQUE
# st_info -> (binding, kind) for the entries kept: defined functions only.
_INFO_TABLE = {
    (bind << 4) | stype: (name, "ifunc" if stype == _STT_GNU_IFUNC else "func")
    for bind, name in _BINDINGS.items()
    for stype in (_STT_FUNC, _STT_GNU_IFUNC)
}
_VERSYM_HIDDEN = 0x8000


class Symbol(NamedTuple):
    """A function symbol. ``address`` is the link-time st_value, not a runtime address."""

    name: str
    address: int
    size: int
    binding: str  # "global", "weak" or "local"
    kind: str = "func"  # "ifunc": the address is the resolver, not the implementation


_BINDING_RANK = {"global": 0, "weak": 1, "local": 2}


def preference(sym: Symbol) -> tuple:
    """Sort key choosing the best of several names for one address.

    A user recognises the exported name (``puts``, weak in glibc) sooner than
    an internal alias (``_IO_puts``, global), and an unversioned name sooner
    than an old version: underscores count before binding.
    """
    name = sym.name
    return (
        "@" in name,
        len(name) - len(name.lstrip("_")),
        _BINDING_RANK.get(sym.binding, 3),
        len(name),
        name,
    )


def lookup_order(s: Symbol) -> tuple:
    """Sort key for several functions of one name: global before weak before local, then by address."""
    return (_BINDING_RANK[s[3]], s[1])


def read_functions(
    data: bytes, strtab: bytes, hidden: dict[int, str] | None, is_dynsym: bool
) -> list[Symbol]:
    """The defined functions of one symbol table DATA (whole Elf64_Sym entries), names from STRTAB.

    HIDDEN (from ``hidden_versions``) names the .dynsym entries that are an old version.
    """
    # Per-entry Python work is the whole cost here (thousands of entries), so
    # everything is a comprehension over precomputed tables, and names are
    # sliced from one decoded string instead of decoded one by one.
    rows = SYM64.iter_unpack(data)
    if is_dynsym and hidden:
        rows = list(rows)
        picked = [i for i, e in enumerate(rows) if e[3] != _SHN_UNDEF and e[1] in _INFO_TABLE]
        entries = [rows[i] for i in picked]
    else:
        picked = None
        entries = [e for e in rows if e[3] != _SHN_UNDEF and e[1] in _INFO_TABLE]
    if strtab.isascii():
        text = strtab.decode("ascii")
        find = text.find
        names = [text[e[0] : find("\0", e[0])] for e in entries]
    else:
        find = strtab.find
        names = [strtab[e[0] : find(b"\0", e[0])].decode("utf-8", "replace") for e in entries]
    if picked is not None:
        # An old version of a symbol (memcpy@GLIBC_2.2.5) is what the dynamic
        # linker never binds a new reference to; name it as .symtab does, so
        # that "memcpy" means the default version.
        names = [f"{n}@{hidden[i]}" if i in hidden else n for n, i in zip(names, picked)]
    elif not is_dynsym:
        names = [n[: n.index("@@")] if "@@" in n else n for n in names]  # default version: plain name
    new = tuple.__new__
    info = _INFO_TABLE
    return [new(Symbol, (n, e[4], e[5]) + info[e[1]]) for n, e in zip(names, entries) if n]


def object_value(table: bytes, strtab: bytes, name: str) -> int | None:
    """st_value of the defined data object NAME (STT_OBJECT) in symbol table TABLE, or None.

    Found by its bytes in STRTAB: no entry is decoded, so a lookup costs one scan of the table.
    """
    wanted = name.encode() + b"\0"
    for st_name, info, _other, shndx, value, _size in SYM64.iter_unpack(
            table[: len(table) - len(table) % SYM64.size]):
        if shndx and info & 0xF == _STT_OBJECT and strtab.startswith(wanted, st_name):
            return value
    return None


def hidden_versions(versym: bytes, data: bytes, count: int, strtab: bytes) -> dict[int, str]:
    """dynsym index -> version name, for symbols whose version is not the default."""
    names: dict[int, str] = {}
    off = 0
    for _ in range(count or 1 << 16):
        if off + 20 > len(data):
            break
        _ver, _flags, ndx, cnt, _hash, aux, nxt = struct.unpack_from("<HHHHIII", data, off)
        if cnt and off + aux + 4 <= len(data):
            (name_off,) = struct.unpack_from("<I", data, off + aux)
            names[ndx] = strtab[name_off : strtab.find(b"\0", name_off)].decode("utf-8", "replace")
        if not nxt:
            break
        off += nxt
    hidden = {}
    for index, (v,) in enumerate(struct.iter_unpack("<H", versym)):
        if v & _VERSYM_HIDDEN and (v & 0x7FFF) in names:
            hidden[index] = names[v & 0x7FFF]
    return hidden
