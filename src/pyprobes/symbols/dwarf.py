"""Function parameters from DWARF: names, types and where each one is at the function's entry.

A module's debug info is in the file itself or in the separate debug file that debuginfo.py
finds by build-id or .gnu_debuglink. It is parsed lazily with pyelftools: the compile unit
holding an address is found through .debug_aranges and only that unit is read; every unit
read and every module is cached for the life of the process.

Locations are evaluated at the entry pc only, where a probe on a function sits. The forms
handled are the ones compilers emit there: a register (DW_OP_reg*), a stack slot (DW_OP_breg*,
DW_OP_fbreg with a DW_OP_call_frame_cfa frame base), a constant, DW_OP_entry_value of a
register (at the entry pc the entry value is the register itself), and location lists, of
which the entry covering the entry pc is used. Anything else is reported as unavailable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PyprobesError

__all__ = ["DebugInfo", "DebugInfoError", "FunctionInfo", "Location", "NoDebugInfo", "Parameter", "TypeInfo",
           "debug_info_for", "NO_DEBUG_INFO_HINT"]

NO_DEBUG_INFO_HINT = ("install its debug symbols (the -dbg or -dbgsym package, or debuginfod) "
                      "or build it with -g")

# DW_ATE_* encodings of base types.
_ENCODINGS = {1: "unsigned", 2: "bool", 3: "unknown", 4: "float", 5: "signed", 6: "char", 7: "unsigned",
              8: "char", 0x10: "unsigned"}
_ASSEMBLER = 0x8001  # DW_LANG_Mips_Assembler, what gas writes for a .S file
_QUALIFIERS = {"DW_TAG_const_type": "const", "DW_TAG_volatile_type": "volatile",
               "DW_TAG_restrict_type": "restrict", "DW_TAG_atomic_type": "_Atomic"}
_AGGREGATES = {"DW_TAG_structure_type": "struct", "DW_TAG_union_type": "union",
               "DW_TAG_enumeration_type": "enum", "DW_TAG_class_type": "class"}


class NoDebugInfo(PyprobesError):
    """The module has no DWARF, neither in the file nor in a separate debug file."""


class DebugInfoError(PyprobesError):
    """The module's DWARF could not be read (pyelftools' own errors, one line)."""


@dataclass(frozen=True)
class TypeInfo:
    """A parameter's type with typedefs and qualifiers resolved.

    kind: signed, unsigned, char, bool, float (numbers of SIZE bytes), string (a pointer to a
    char type), pointer, struct, union, enum (a number of SIZE bytes), array or unknown."""

    name: str
    kind: str
    size: int


@dataclass(frozen=True)
class Location:
    """Where a value is at the entry pc.

    kind: "register" (REGISTER holds it; xmm0..15 for floating types), "memory" (at
    REGISTER + OFFSET), "constant" (VALUE) or "unavailable" (REASON says why)."""

    kind: str
    register: str = ""
    offset: int = 0
    value: int = 0
    reason: str = ""


@dataclass(frozen=True)
class Parameter:
    name: str
    type: TypeInfo
    location: Location


@dataclass
class FunctionInfo:
    name: str
    entry: int  # link-time address of the entry pc
    parameters: list[Parameter] = field(default_factory=list)
    return_type: TypeInfo | None = None  # None: void
    variadic: bool = False  # ends in "...": only the named parameters are read

    def signature(self) -> str:
        """C-like: "int open_file(const char *path, int flags)"."""
        params = ", ".join([_declaration(p.type.name, p.name) for p in self.parameters]
                           + (["..."] if self.variadic else [])) or "void"
        return _declaration(self.return_type.name if self.return_type else "void", f"{self.name}({params})")


def _declaration(type_name: str, name: str) -> str:
    return f"{type_name}{name}" if type_name.endswith(("*", "&")) else f"{type_name} {name}"


VOID = TypeInfo("void", "unknown", 0)
UNKNOWN = TypeInfo("?", "unknown", 0)


class DebugInfo:
    """One module's DWARF. function_at(link address) -> FunctionInfo or None."""

    def __init__(self, path: str) -> None:
        from elftools.elf.elffile import ELFFile

        self.path = path
        self._file = open(path, "rb")
        elf = ELFFile(self._file)
        if elf.get_section_by_name(".debug_info") is None and elf.get_section_by_name(".zdebug_info") is None:
            self._file.close()
            raise NoDebugInfo(path)
        self._dwarf = elf.get_dwarf_info()
        self._aranges = None
        try:
            self._aranges = self._dwarf.get_aranges()
        except Exception:  # no or malformed .debug_aranges: every unit is read instead
            self._aranges = None
        self._functions: dict[int, FunctionInfo] = {}
        self._units_read: set[int] = set()
        self._all_read = False
        from elftools.dwarf.dwarf_expr import DWARFExprParser
        from elftools.dwarf.locationlists import LocationParser

        self._expr = DWARFExprParser(self._dwarf.structs)
        self._locations = LocationParser(self._dwarf.location_lists())

    def function_at(self, address: int) -> FunctionInfo | None:
        """The function whose entry pc is ADDRESS (link-time), or None. Raises DebugInfoError."""
        try:
            return self._function_at(address)
        except PyprobesError:
            raise
        except Exception as e:  # pyelftools raises many kinds on a corrupt file
            raise DebugInfoError(f"{self.path}: unreadable debug info ({e})") from None

    def _function_at(self, address: int) -> FunctionInfo | None:
        if address in self._functions:
            return self._functions[address]
        offset = None
        if self._aranges is not None:
            try:
                offset = self._aranges.cu_offset_at_addr(address)
            except Exception:
                offset = None
        if offset is not None and offset not in self._units_read:
            self._read_unit(self._dwarf.get_CU_at(offset))
        elif offset is None and not self._all_read:
            self.read_all()
        return self._functions.get(address)

    def functions(self) -> list[FunctionInfo]:
        """Every function with an entry pc, sorted by address. Raises DebugInfoError."""
        try:
            self.read_all()
        except Exception as e:
            raise DebugInfoError(f"{self.path}: unreadable debug info ({e})") from None
        return sorted(self._functions.values(), key=lambda f: f.entry)

    def read_all(self) -> None:
        if self._all_read:
            return
        for cu in self._dwarf.iter_CUs():
            if cu.cu_offset not in self._units_read:
                self._read_unit(cu)
        self._all_read = True

    # ------------------------------------------------------------------ one unit
    def _read_unit(self, cu) -> None:
        self._units_read.add(cu.cu_offset)
        top = cu.get_top_DIE()
        if _attr(top, "DW_AT_language", 0) == _ASSEMBLER:
            return  # its subprograms have neither parameters nor types: raw registers say more
        base = _attr(top, "DW_AT_low_pc", 0)
        stack = [top]
        while stack:
            die = stack.pop()
            for child in die.iter_children():
                if child.tag == "DW_TAG_subprogram":
                    info = self._function(child, cu, base)
                    if info is not None:
                        self._functions.setdefault(info.entry, info)
                elif child.tag in ("DW_TAG_namespace", "DW_TAG_structure_type", "DW_TAG_class_type"):
                    stack.append(child)

    def _function(self, die, cu, base: int) -> FunctionInfo | None:
        entry = _attr(die, "DW_AT_entry_pc", None)
        low = _attr(die, "DW_AT_low_pc", None)
        if entry is not None and low is not None and die.attributes["DW_AT_entry_pc"].form.startswith(
                ("DW_FORM_data", "DW_FORM_udata", "DW_FORM_sdata")):
            entry += low  # DWARF 5: a constant entry_pc is an offset from low_pc
        if entry is None:
            entry = low
        if entry is None and "DW_AT_ranges" in die.attributes:
            entry = self._first_range(die, cu, base)
        if entry is None or isinstance(entry, bool):
            return None
        origin = _origin(die)
        name = _attr(origin, "DW_AT_name", b"").decode(errors="replace") if origin is not None else ""
        if not name:
            return None
        frame_base = self._frame_base_is_cfa(die)
        params = []
        variadic = False
        for child in die.iter_children():
            variadic = variadic or child.tag == "DW_TAG_unspecified_parameters"
            if child.tag != "DW_TAG_formal_parameter":
                continue
            decl = _origin(child)
            pname = _attr(decl, "DW_AT_name", b"").decode(errors="replace") or f"arg{len(params)}"
            ptype = self._type(decl)
            params.append(Parameter(pname, ptype, self._location(child, cu, base, entry, frame_base)))
        ret = self._type(origin) if "DW_AT_type" in _with_origin_attrs(origin) else None
        return FunctionInfo(name, entry, _entry_registers(params, ret), ret, variadic)

    def _first_range(self, die, cu, base: int) -> int | None:
        try:
            ranges = self._dwarf.range_lists().get_range_list_at_offset(die.attributes["DW_AT_ranges"].value, cu=cu)
        except Exception:
            return None
        for r in ranges:
            if hasattr(r, "begin_offset"):
                return r.begin_offset + (0 if getattr(r, "is_absolute", False) else base)
        return None

    def _frame_base_is_cfa(self, die) -> bool:
        attr = die.attributes.get("DW_AT_frame_base")
        if attr is None or attr.form not in ("DW_FORM_exprloc", "DW_FORM_block1"):
            return False
        ops = self._expr.parse_expr(attr.value)
        return len(ops) == 1 and ops[0].op_name == "DW_OP_call_frame_cfa"

    # ------------------------------------------------------------------ locations
    def _location(self, die, cu, base: int, entry: int, frame_base_is_cfa: bool) -> Location:
        attr = die.attributes.get("DW_AT_location")
        if attr is None:
            if "DW_AT_const_value" in die.attributes:
                return Location("constant", value=int(die.attributes["DW_AT_const_value"].value))
            return Location("unavailable", reason="optimised out")
        try:
            parsed = self._locations.parse_from_attribute(attr, cu["version"], die)
        except Exception as e:
            return Location("unavailable", reason=f"unreadable location ({e})")
        if hasattr(parsed, "loc_expr"):
            return self._expression(parsed.loc_expr, frame_base_is_cfa)
        for item in parsed:
            if hasattr(item, "base_address") and not hasattr(item, "loc_expr"):
                base = item.base_address
                continue
            if not hasattr(item, "loc_expr"):
                continue
            offset = 0 if getattr(item, "is_absolute", False) else base
            if item.begin_offset + offset <= entry < item.end_offset + offset:
                return self._expression(item.loc_expr, frame_base_is_cfa)
        return Location("unavailable", reason="no location at the entry pc")

    def _expression(self, expr: bytes, frame_base_is_cfa: bool) -> Location:
        try:
            ops = self._expr.parse_expr(expr)
        except Exception:
            return Location("unavailable", reason="unreadable location expression")
        names = [op.op_name for op in ops]
        if len(ops) == 1:
            op = ops[0]
            if op.op_name.startswith("DW_OP_reg"):
                number = op.args[0] if op.op_name == "DW_OP_regx" else int(op.op_name[9:])
                return _register(number)
            if op.op_name.startswith("DW_OP_breg"):
                number = op.args[0] if op.op_name == "DW_OP_bregx" else int(op.op_name[10:])
                offset = op.args[-1]
                reg = _register(number)
                return Location("memory", reg.register, offset) if reg.kind == "register" else reg
            if op.op_name == "DW_OP_fbreg":
                from ..x86.arch import ENTRY_CFA_OFFSET, STACK_POINTER  # x86/ loads iced-x86: only when needed

                if not frame_base_is_cfa:
                    return Location("unavailable", reason="frame base is not the CFA")
                offset = ENTRY_CFA_OFFSET + op.args[0]
                if op.args[0] < 0:  # inside the callee's own frame: not written yet at the entry pc
                    return Location("unavailable", reason=_NOT_YET_WRITTEN)
                return Location("memory", STACK_POINTER, offset)
        if names and names[-1] == "DW_OP_stack_value" and len(ops) == 2:
            op = ops[0]
            if op.op_name in ("DW_OP_entry_value", "DW_OP_GNU_entry_value"):
                inner = op.args[0]
                if len(inner) == 1 and inner[0].op_name.startswith("DW_OP_reg"):
                    return _register(int(inner[0].op_name[9:]) if inner[0].op_name != "DW_OP_regx" else inner[0].args[0])
            if op.op_name.startswith("DW_OP_lit"):
                return Location("constant", value=int(op.op_name[9:]))
            if op.op_name.startswith("DW_OP_const") and op.args:
                return Location("constant", value=int(op.args[0]))
        return Location("unavailable", reason="location expression " + " ".join(names))

    # ------------------------------------------------------------------ types
    def _type(self, die, depth: int = 0) -> TypeInfo:
        if die is None or depth > 16:
            return UNKNOWN
        attrs = _with_origin_attrs(die)
        if "DW_AT_type" not in attrs:
            return VOID
        try:
            target = die.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in die.attributes else \
                _origin(die).get_DIE_from_attribute("DW_AT_type")
        except Exception:
            return UNKNOWN
        return self._describe(target, depth)

    def _describe(self, die, depth: int = 0) -> TypeInfo:
        if die is None or depth > 16:
            return UNKNOWN
        tag = die.tag
        name = _attr(die, "DW_AT_name", b"").decode(errors="replace")
        size = _attr(die, "DW_AT_byte_size", 0) or 0
        if tag == "DW_TAG_base_type":
            kind = _ENCODINGS.get(_attr(die, "DW_AT_encoding", 0), "unknown")
            if kind == "char" and size != 1:
                kind = "signed" if _attr(die, "DW_AT_encoding", 0) == 6 else "unsigned"
            return TypeInfo(name, kind, size)
        if tag == "DW_TAG_typedef":
            inner = self._type(die, depth + 1)
            return TypeInfo(name, inner.kind, inner.size)
        if tag in _QUALIFIERS:
            inner = self._type(die, depth + 1)
            return TypeInfo(f"{_QUALIFIERS[tag]} {inner.name}", inner.kind, inner.size)
        if tag in ("DW_TAG_pointer_type", "DW_TAG_reference_type", "DW_TAG_rvalue_reference_type"):
            inner = self._type(die, depth + 1)
            star = "*" if tag == "DW_TAG_pointer_type" else "&"
            kind = "string" if inner.kind == "char" and star == "*" else "pointer"
            return TypeInfo(f"{inner.name} {star}".replace("* *", "**"), kind, size or 8)
        if tag in _AGGREGATES:
            return TypeInfo(f"{_AGGREGATES[tag]} {name or '<anonymous>'}",
                            "enum" if tag == "DW_TAG_enumeration_type" else _AGGREGATES[tag], size)
        if tag == "DW_TAG_array_type":
            inner = self._type(die, depth + 1)
            return TypeInfo(f"{inner.name}[]", "array", size)
        if tag == "DW_TAG_subroutine_type":
            return TypeInfo("<function>", "unknown", 0)
        return TypeInfo(name or "?", "unknown", size)


_NOT_YET_WRITTEN = "in the function's frame, not yet written at entry"


def _entry_registers(params: list[Parameter], ret: TypeInfo | None) -> list[Parameter]:
    """Unoptimised code describes parameters by their home in the frame, which the prologue has
    not filled yet at the entry pc. There they are still where the calling convention put them:
    integer and pointer arguments in order in the integer registers, floating ones in the SSE
    registers. Used only while every parameter so far is a scalar the convention passes in a
    register; after an aggregate or a long double the assignment is unknown and stops."""
    from ..x86.arch import INTEGER_ARGUMENT_REGISTERS, SSE_ARGUMENT_REGISTERS

    if not any(p.location.reason == _NOT_YET_WRITTEN for p in params):
        return params
    # A large aggregate is returned through memory whose address the caller passes first.
    integer = 1 if ret is not None and ret.kind in ("struct", "union", "class", "array", "unknown") \
        and ret.size > 16 else 0
    sse = 0
    out = []
    known = True
    for p in params:
        kind, size = p.type.kind, p.type.size
        if kind == "float" and size in (4, 8):
            pool, index = SSE_ARGUMENT_REGISTERS, sse
            sse += 1
        elif kind in ("signed", "unsigned", "char", "bool", "enum", "string", "pointer") and 0 < size <= 8:
            pool, index = INTEGER_ARGUMENT_REGISTERS, integer
            integer += 1
        else:
            known = False
            pool, index = (), 0
        if p.location.reason == _NOT_YET_WRITTEN and known and index < len(pool):
            p = Parameter(p.name, p.type, Location("register", pool[index]))
        out.append(p)
    return out


def _register(number: int) -> Location:
    from ..x86.arch import DWARF_REGISTERS

    name = DWARF_REGISTERS.get(number)
    if name is None:
        return Location("unavailable", reason=f"DWARF register {number}")
    return Location("register", name)


def _attr(die, name: str, default: Any) -> Any:
    if die is None:
        return default
    attr = die.attributes.get(name)
    return default if attr is None else attr.value


def _origin(die):
    """The DIE carrying name and type: DIE itself, or where its abstract_origin / specification lead."""
    seen = 0
    while die is not None and seen < 8 and "DW_AT_name" not in die.attributes:
        for link in ("DW_AT_abstract_origin", "DW_AT_specification"):
            if link in die.attributes:
                die = die.get_DIE_from_attribute(link)
                break
        else:
            break
        seen += 1
    return die


def _with_origin_attrs(die) -> dict:
    if die is None:
        return {}
    attrs = dict(die.attributes)
    origin = _origin(die)
    if origin is not None and origin is not die:
        attrs = {**origin.attributes, **attrs}
    return attrs


_CACHE: dict[str, DebugInfo | None] = {}


def debug_info_for(path: str) -> DebugInfo:
    """The DWARF of the module at PATH (its own, or its separate debug file), parsed lazily and
    cached. Raises NoDebugInfo when there is none."""
    key = str(Path(path))
    if key not in _CACHE:
        _CACHE[key] = _load(key)
    info = _CACHE[key]
    if info is None:
        raise NoDebugInfo(f"{path} has no debug info: {NO_DEBUG_INFO_HINT}")
    return info


def _load(path: str) -> DebugInfo | None:
    from .debuginfo import find_debug_file
    from .elf import ElfError, ElfFile

    try:
        return DebugInfo(path)
    except NoDebugInfo:
        pass
    except Exception:  # unreadable as ELF or DWARF: as good as none
        return None
    try:
        separate = find_debug_file(ElfFile.load(path))
    except (ElfError, OSError):
        return None
    if separate is None:
        return None
    try:
        return DebugInfo(str(separate))
    except Exception:
        return None
