/* The latency workload of bench/latency.py: functions of known cost, each timed by the program.
 *
 *   latency FUNCTION N   calls FUNCTION N times; prints each call's own duration quantiles
 *
 * tiny   lea + ret after a 5-byte nop: about 2 ns
 * spin   busy-waits until CLOCK_MONOTONIC has advanced 1000 ns
 * nap    clock_nanosleep of 1 ms
 * Each call is timed with CLOCK_MONOTONIC around it (for tiny, the loop's time per call, since
 * a clock read costs ten times the function). Output: calls=N median_ns=M p10_ns=A p90_ns=B sink=S
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

long tiny(long);
__asm__(
    ".text\n.globl tiny\n.type tiny, @function\n.p2align 4\n"
    "tiny:\n"
    "    .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n"  /* nopl 0x0(%rax,%rax,1): the kernel's best case */
    "    lea 0x1(%rdi,%rdi,2), %rax\n"
    "    ret\n"
    ".size tiny, .-tiny\n");

static inline long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

__attribute__((noinline)) long spin(long ns)
{
    long t0 = now_ns(), t;
    while ((t = now_ns()) - t0 < ns)
        ;
    return t - t0;
}

__attribute__((noinline)) long nap(long ms)
{
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    clock_nanosleep(CLOCK_MONOTONIC, 0, &t, NULL);
    return ms;
}

static int cmp(const void *a, const void *b)
{
    long x = *(const long *)a, y = *(const long *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    const char *f = argv[1];
    long n = atol(argv[2]), sink = 0;
    long *d = calloc(n > 0 ? n : 1, sizeof *d);
    if (!strcmp(f, "tiny")) {
        long t0 = now_ns();
        for (long i = 0; i < n; i++)
            sink += tiny(i);
        long per = n ? (now_ns() - t0) / n : 0;
        for (long i = 0; i < n; i++)
            d[i] = per;
    } else {
        for (long i = 0; i < n; i++) {
            long t0 = now_ns();
            sink += !strcmp(f, "spin") ? spin(1000) : nap(1);
            d[i] = now_ns() - t0;
        }
    }
    qsort(d, n, sizeof *d, cmp);
    printf("calls=%ld median_ns=%ld p10_ns=%ld p90_ns=%ld sink=%ld\n", n, d[n / 2], d[n / 10],
           d[n * 9 / 10], sink);
    return 0;
}
