"""symbols/dwarf.py on a C fixture built with -O2 -g: parameter names, resolved types, and
locations at the entry pc (registers, and location lists whose first entry covers it)."""
from __future__ import annotations

import pytest
from elftools.elf.elffile import ELFFile

from pyprobes.symbols import ElfFile, NoDebugInfo, debug_info_for
from pyprobes.symbols.dwarf import DebugInfo


@pytest.fixture(scope="module")
def optimised(build):
    return build("dwarf_args.c", "-O2", output="dwarf_args_o2")


@pytest.fixture(scope="module")
def functions(optimised):
    info = debug_info_for(str(optimised))
    return {f.name: f for f in info.functions()}


def shape(fn):
    return [(p.name, p.type.name, p.type.kind, p.type.size, p.location.kind, p.location.register)
            for p in fn.parameters]


def test_integer_string_and_double_parameters(functions):
    assert shape(functions["open_file"]) == [
        ("path", "const char *", "string", 8, "register", "rdi"),
        ("flags", "int", "signed", 4, "register", "rsi")]
    assert shape(functions["store"]) == [
        ("key", "const char *", "string", 8, "register", "rdi"),
        ("n", "long int", "signed", 8, "register", "rsi"),
        ("w", "double", "float", 8, "register", "xmm0")]
    assert functions["store"].signature() == "long int store(const char *key, long int n, double w)"


def test_unsigned_typedef_bool_and_char(functions):
    assert shape(functions["mix"]) == [
        ("u", "unsigned int", "unsigned", 4, "register", "rdi"),
        ("c", "counter_t", "unsigned", 8, "register", "rsi"),  # the typedef keeps its name, its kind is resolved
        ("b", "_Bool", "bool", 1, "register", "rdx"),
        ("ch", "char", "char", 1, "register", "rcx")]


def test_struct_pointer_enum_and_float(functions):
    assert shape(functions["area"]) == [
        ("p", "const struct point *", "pointer", 8, "register", "rdi"),
        ("c", "enum color", "enum", 4, "register", "rsi"),
        ("scale", "float", "float", 4, "register", "xmm0")]
    assert functions["half"].return_type.name == "double"
    assert shape(functions["lerp"]) == [
        ("a", "double", "float", 8, "register", "xmm0"),
        ("b", "double", "float", 8, "register", "xmm1"),
        ("t", "float", "float", 4, "register", "xmm2")]


def test_stack_arguments_are_memory_above_the_return_address(functions):
    """At the entry pc the CFA is rsp + 8: the 7th and 8th integer arguments are at rsp+8, rsp+16."""
    locations = [(p.name, p.location.kind, p.location.register, p.location.offset)
                 for p in functions["many"].parameters[6:]]
    assert locations == [("a7", "memory", "rsp", 8), ("a8", "memory", "rsp", 16)]


def test_location_lists_pick_the_entry_covering_the_entry_pc(optimised, functions):
    """At -O2 both parameters of twice() have location lists (a moves to a callee-saved register,
    b becomes DW_OP_entry_value after the first call); at the entry pc they are rdi and rsi."""
    with open(optimised, "rb") as f:
        dwarf = ELFFile(f).get_dwarf_info()
        forms = {}
        for cu in dwarf.iter_CUs():
            for die in cu.iter_DIEs():
                if die.tag == "DW_TAG_subprogram" and die.attributes.get("DW_AT_name") and \
                        die.attributes["DW_AT_name"].value == b"twice":
                    for child in die.iter_children():
                        if child.tag == "DW_TAG_formal_parameter":
                            forms[child.attributes["DW_AT_name"].value] = child.attributes["DW_AT_location"].form
    assert forms and all(form in ("DW_FORM_sec_offset", "DW_FORM_loclistx") for form in forms.values()), forms
    assert shape(functions["twice"]) == [
        ("a", "long int", "signed", 8, "register", "rdi"),
        ("b", "long int", "signed", 8, "register", "rsi")]


def test_entry_pcs_are_the_symbols(optimised, functions):
    elf = ElfFile.load(optimised)
    for name in ("open_file", "store", "mix", "area", "half", "twice", "main"):
        assert [s.address for s in elf.lookup(name)] == [functions[name].entry], name
        assert debug_info_for(str(optimised)).function_at(functions[name].entry) is functions[name]


def test_no_debug_info(build):
    plain = build("dwarf_args.c", "-O2", "-g0", output="dwarf_args_nodebug")
    with pytest.raises(NoDebugInfo) as e:
        debug_info_for(str(plain))
    assert "no debug info" in str(e.value) and "-dbg" in str(e.value) and "-g" in str(e.value)
    with pytest.raises(NoDebugInfo):
        DebugInfo(str(plain))


def test_separate_debug_file_found_by_debuglink(build, tmp_path):
    full = build("dwarf_args.c", "-O2", output="dwarf_args_o2")
    import shutil
    import subprocess
    if shutil.which("objcopy") is None:
        pytest.skip("objcopy is not installed")
    exe = tmp_path / "prog"
    shutil.copy(full, exe)
    subprocess.run(["objcopy", "--only-keep-debug", str(exe), str(tmp_path / "prog.debug")], check=True)
    subprocess.run(["objcopy", "--strip-debug", f"--add-gnu-debuglink={tmp_path / 'prog.debug'}", str(exe)],
                   check=True, cwd=tmp_path)
    fn = next(f for f in debug_info_for(str(exe)).functions() if f.name == "store")
    assert [p.name for p in fn.parameters] == ["key", "n", "w"]
