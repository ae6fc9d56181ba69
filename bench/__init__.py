"""pyprobes benchmarks: `python -m bench` (see bench/__main__.py).

One workload binary (bench/work.c), probed by pyprobes in each execution class, by a minimal C
ptrace tracer (bench/cfloor.c, the floor of any breakpoint design), and by the tools installed on
the machine (gdb, ltrace, bpftrace, the kernel's uprobes through tracefs), with the per-hit cost
measured by the workload itself and the unprobed run subtracted.

Smaller measurements, each printing its own table with a reference row from the same run (the
timing that tests must not assert lives here):
    python -m bench.busy_wait         poll budgets: µs per hit, and polls caught / timed out / skipped
    python -m bench.resolve           symbol layer: resolve('libc:*') cold and warm, next to reading libc
    python -m bench.retprobe_latency  a return probe's duration of a 10 ms call, next to the program's own
    python -m bench.wake              Tracee.wait() woken from a signal handler, next to the timer's delay
"""
