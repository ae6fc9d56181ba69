/* The C ptrace floor: the least a breakpoint tracer can do per hit, in C.
 *
 *   cfloor MODE PROBE SLOT FIRST_LOAD -- PROGRAM [ARGS...]
 *
 * PROBE, SLOT and FIRST_LOAD are link-time addresses (hex) in PROGRAM: the probed instruction,
 * a hand-made slot holding its copy followed by a jmp back to the next original instruction, and
 * the vaddr of PROGRAM's first PT_LOAD (for the load bias, read from /proc/PID/maps). MODE:
 *   boost    int3 -> RIP = slot, PTRACE_CONT; the slot's jmp comes back        (1 stop per hit)
 *   step     int3 -> RIP = slot, PTRACE_SINGLESTEP; step trap -> RIP = PROBE + (RIP - slot),
 *            PTRACE_CONT                                                      (2 stops per hit)
 *   emulate  the probed instruction is the 5-byte nop: RIP = PROBE+5, PTRACE_CONT (1 stop per hit)
 *   MODE+poll (boost+poll, ...): after each resume, poll waitpid(WNOHANG) for up to 25 µs before
 *            blocking, as pyprobes does by default (Process.busy_wait_us)
 *
 * Each stop reads RIP first to check it is the probe's, as any real tracer must. Prints to
 * stderr after the program exits: "cfloor: mode=M hits=N wall_ns_per_hit=W user_ns_per_hit=U
 * sys_ns_per_hit=S" (wall includes start-up, the workload's own timing is the one to use; user and
 * sys are the tracer's own CPU time).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define RIP_OFF offsetof(struct user_regs_struct, rip)

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static uint64_t load_bias(pid_t pid, const char *exe, uint64_t first_load)
{
    char path[64], line[PATH_MAX + 256], real[PATH_MAX];
    if (!realpath(exe, real))
        die("realpath");
    snprintf(path, sizeof path, "/proc/%d/maps", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        die("maps");
    while (fgets(line, sizeof line, f)) {
        unsigned long start, end, off;
        char perms[8], file[PATH_MAX];
        file[0] = 0;
        if (sscanf(line, "%lx-%lx %7s %lx %*s %*s %4095s", &start, &end, perms, &off, file) >= 4
            && off == 0 && strcmp(file, real) == 0) {
            fclose(f);
            return start - (first_load & ~0xfffUL);
        }
    }
    fprintf(stderr, "cfloor: %s not found in %s\n", real, path);
    exit(2);
}

static double mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

/* waitpid, polled for up to 25 µs first when POLL is set */
static int wait_stop(pid_t pid, int *st, int poll)
{
    if (poll) {
        double deadline = mono_ns() + 25000;
        do {
            int r = waitpid(pid, st, WNOHANG);
            if (r != 0)
                return r;
        } while (mono_ns() < deadline);
    }
    return waitpid(pid, st, 0);
}

int main(int argc, char **argv)
{
    if (argc < 7 || strcmp(argv[5], "--") != 0) {
        fprintf(stderr, "usage: cfloor boost|step|emulate[+poll] PROBE SLOT FIRST_LOAD -- PROGRAM [ARGS...]\n");
        return 2;
    }
    char mode[32];
    snprintf(mode, sizeof mode, "%s", argv[1]);
    char *plus = strchr(mode, '+');
    int poll = plus && !strcmp(plus, "+poll");
    if (poll)
        *plus = 0;
    int boost = !strcmp(mode, "boost"), step = !strcmp(mode, "step"), emulate = !strcmp(mode, "emulate");
    if (!boost && !step && !emulate) {
        fprintf(stderr, "cfloor: unknown mode %s\n", mode);
        return 2;
    }
    uint64_t probe = strtoull(argv[2], NULL, 16), slot = strtoull(argv[3], NULL, 16);
    uint64_t first_load = strtoull(argv[4], NULL, 16);

    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        if (ptrace(PTRACE_TRACEME, 0, 0, 0) < 0)
            die("PTRACE_TRACEME");
        execvp(argv[6], argv + 6);
        die("execvp");
    }
    int st;
    if (waitpid(pid, &st, 0) < 0 || !WIFSTOPPED(st))  /* the exec stop */
        die("exec stop");
    ptrace(PTRACE_SETOPTIONS, pid, 0, PTRACE_O_EXITKILL);
    uint64_t bias = load_bias(pid, argv[6], first_load);
    probe += bias, slot += bias;

    errno = 0;
    long word = ptrace(PTRACE_PEEKTEXT, pid, (void *)probe, 0);
    if (errno)
        die("PEEKTEXT");
    if (ptrace(PTRACE_POKETEXT, pid, (void *)probe, (void *)((word & ~0xffL) | 0xcc)) < 0)
        die("POKETEXT");

    long hits = 0;
    int sig = 0;
    for (;;) {
        if (ptrace(PTRACE_CONT, pid, 0, (void *)(long)sig) < 0)
            die("PTRACE_CONT");
        sig = 0;
        if (wait_stop(pid, &st, poll) < 0)
            die("waitpid");
        if (WIFEXITED(st) || WIFSIGNALED(st))
            break;
        if (!WIFSTOPPED(st))
            continue;
        if (WSTOPSIG(st) != SIGTRAP) {
            sig = WSTOPSIG(st);
            continue;
        }
        uint64_t rip = ptrace(PTRACE_PEEKUSER, pid, (void *)RIP_OFF, 0);
        if (rip != probe + 1) {
            sig = SIGTRAP;  /* not ours */
            continue;
        }
        hits++;
        if (emulate) {  /* the 5-byte nop */
            if (ptrace(PTRACE_POKEUSER, pid, (void *)RIP_OFF, (void *)(probe + 5)) < 0)
                die("POKEUSER");
            continue;
        }
        if (ptrace(PTRACE_POKEUSER, pid, (void *)RIP_OFF, (void *)slot) < 0)
            die("POKEUSER");
        if (boost)
            continue;
        if (ptrace(PTRACE_SINGLESTEP, pid, 0, 0) < 0)
            die("SINGLESTEP");
        if (wait_stop(pid, &st, poll) < 0 || !WIFSTOPPED(st) || WSTOPSIG(st) != SIGTRAP) {
            fprintf(stderr, "cfloor: unexpected stop 0x%x after a single-step\n", st);
            return 2;
        }
        rip = ptrace(PTRACE_PEEKUSER, pid, (void *)RIP_OFF, 0);
        /* the fixup a real tracer does: back to original code, the same distance on */
        if (ptrace(PTRACE_POKEUSER, pid, (void *)RIP_OFF, (void *)(probe + (rip - slot))) < 0)
            die("POKEUSER");
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ns = (t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec);
    struct rusage ru;  /* the tracer's own CPU time (not the tracee's) */
    getrusage(RUSAGE_SELF, &ru);
    double user = ru.ru_utime.tv_sec * 1e9 + ru.ru_utime.tv_usec * 1e3;
    double sys = ru.ru_stime.tv_sec * 1e9 + ru.ru_stime.tv_usec * 1e3;
    long h = hits ? hits : 1;
    fprintf(stderr, "cfloor: mode=%s hits=%ld wall_ns_per_hit=%.1f user_ns_per_hit=%.1f sys_ns_per_hit=%.1f\n",
            mode, hits, ns / h, user / h, sys / h);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}
