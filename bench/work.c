/* The benchmark workload: hit(i) stores i*3+1 into a volatile global, called N times.
 *
 * hit is written in assembly so that each probe class has a fixed instruction:
 *   hit+0   nopl 0x0(%rax,%rax,1)   5-byte nop   pyprobes emulates it; kernel uprobes (6.18+) can
 *                                                turn it into a call to a trampoline (no trap)
 *   hit+5   push %rbx                            boosted by pyprobes, emulated by kernel uprobes
 *   hit+6   lea 0x1(%rdi,%rdi,2),%rbx            boosted by pyprobes (stepped with boost=False);
 *                                                single-stepped out of line by kernel uprobes
 *   hit+11  mov %rbx, sink(%rip)                 the volatile store
 *   ...     addq $1, hit_count(%rip); pop %rbx; ret
 *
 * bench_slot is a hand-made instruction slot for the C ptrace floor (bench/cfloor.c): a copy of
 * the lea followed by a jmp back to hit+11, like the slot a boosting tracer builds.
 *
 *   work [N [THREADS [GAP_US]]]: THREADS threads (default 1) each call hit N times, sleeping
 *   GAP_US microseconds between calls (default 0: back to back).
 *
 * Output (one line): calls=N hits=H sink=S ns_per_call=X, where calls counts every thread's calls
 * and ns_per_call is the timed loop's wall time over the calls of one thread.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

volatile long sink;
volatile long hit_count;  /* the workload's own count of hit's executions */

void hit(long i);

__asm__(
    ".text\n"
    ".globl hit\n"
    ".type hit, @function\n"
    ".p2align 4\n"
    "hit:\n"
    "    .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n"  /* nopl 0x0(%rax,%rax,1) */
    "    push %rbx\n"
    "    lea 0x1(%rdi,%rdi,2), %rbx\n"
    ".Lhit_after_lea:\n"
    "    mov %rbx, sink(%rip)\n"
    "    lock addq $1, hit_count(%rip)\n"
    "    pop %rbx\n"
    "    ret\n"
    ".size hit, .-hit\n"
    "\n"
    ".globl bench_slot\n"
    ".type bench_slot, @function\n"
    ".p2align 4\n"
    "bench_slot:\n"
    "    lea 0x1(%rdi,%rdi,2), %rbx\n"
    "    jmp .Lhit_after_lea\n"
    ".size bench_slot, .-bench_slot\n"
);

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static long n = 1000000, gap_us;

static void *loop(void *arg)
{
    (void)arg;
    struct timespec gap = {gap_us / 1000000, gap_us % 1000000 * 1000};
    for (long i = 0; i < n; i++) {
        hit(i);
        if (gap_us)
            nanosleep(&gap, NULL);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    n = argc > 1 ? atol(argv[1]) : 1000000;
    long threads = argc > 2 ? atol(argv[2]) : 1;
    gap_us = argc > 3 ? atol(argv[3]) : 0;
    if (threads < 1 || threads > 64)
        threads = 1;
    pthread_t t[64];
    hit(-1);  /* one warm-up call outside the timed loop (counted in hits) */
    double t0 = now_ns();
    for (long i = 1; i < threads; i++)
        pthread_create(&t[i], NULL, loop, NULL);
    loop(NULL);
    for (long i = 1; i < threads; i++)
        pthread_join(t[i], NULL);
    double t1 = now_ns();
    long expect = 3 * (n - 1) + 1;
    if (threads == 1 && n > 0 && sink != expect) {
        fprintf(stderr, "work: sink=%ld, expected %ld\n", (long)sink, expect);
        return 1;
    }
    printf("calls=%ld hits=%ld sink=%ld ns_per_call=%.3f\n", n * threads + 1, (long)hit_count, (long)sink,
           n > 0 ? (t1 - t0) / n : 0.0);
    fflush(stdout);
    return 0;
}
