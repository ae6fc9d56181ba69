"""pyprobes benchmarks: `python -m bench` (see bench/__main__.py).

One workload binary (bench/work.c), probed by pyprobes in each execution class, by a minimal C
ptrace tracer (bench/cfloor.c, the floor of any breakpoint design), and by the tools installed on
the machine (gdb, ltrace, bpftrace, the kernel's uprobes through tracefs), with the per-hit cost
measured by the workload itself and the unprobed run subtracted.
"""
