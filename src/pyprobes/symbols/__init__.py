"""Symbols: ELF files, a process's loaded modules, and probe specs resolved to addresses.

The lowest layer: reads files and /proc only, never ptrace.
"""
from .dwarf import DebugInfo, FunctionInfo, NoDebugInfo, Parameter, TypeInfo, debug_info_for
from .elf import CodeReader, ElfError, ElfFile, Segment, Symbol, find_debug_file
from .maps import AT_BASE, AT_ENTRY, Mapping, Module, auxv_value, main_module, modules, parse_maps, read_maps
from .resolve import Spec, SymbolError, Target, find_module, parse_spec, resolve, symbolize

__all__ = [
    "DebugInfo", "FunctionInfo", "NoDebugInfo", "Parameter", "TypeInfo", "debug_info_for",
    "CodeReader", "ElfError", "ElfFile", "Segment", "Symbol", "find_debug_file",
    "AT_BASE", "AT_ENTRY", "Mapping", "Module", "auxv_value", "main_module", "modules", "parse_maps", "read_maps",
    "Spec", "SymbolError", "Target", "find_module", "parse_spec", "resolve", "symbolize",
]
