/* Workloads for bench/tracee_roundtrip.py.
 *   tracee_bench int3 N      execute int3 N times (each one a SIGTRAP stop when traced)
 *   tracee_bench nop N       the same loop with a nop: the unprobed baseline
 *   tracee_bench threads T busy|idle
 *                            T threads in all (main and T-1 more) spinning (busy) or
 *                            sleeping 1 ms at a time (idle) until the tracer writes 1
 *                            into stop_flag
 * int3/nop print "ns_per_iter X"; threads prints "ready STOP_FLAG_ADDR" when all run. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

volatile int stop_flag;
static int started, busy;
volatile long sink[64 * 8];

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static void *worker(void *arg) {
    long i = (long)arg;
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    while (!stop_flag) {
        if (busy)
            sink[i * 8]++;
        else
            usleep(1000);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3)
        return 2;
    if (strcmp(argv[1], "threads") == 0) {
        int n = atoi(argv[2]);
        busy = argc > 3 && strcmp(argv[3], "busy") == 0;
        if (n < 1 || n > 64)
            return 2;
        pthread_t th[64];
        for (long i = 0; i < n - 1; i++)
            pthread_create(&th[i], NULL, worker, (void *)i);
        while (__atomic_load_n(&started, __ATOMIC_SEQ_CST) < n - 1)
            usleep(100);
        printf("ready %p\n", (void *)&stop_flag);
        fflush(stdout);
        worker((void *)(long)(n - 1));
        for (int i = 0; i < n - 1; i++)
            pthread_join(th[i], NULL);
        return 0;
    }
    long n = atol(argv[2]);
    int trap = strcmp(argv[1], "int3") == 0;
    double t0 = now();
    for (long i = 0; i < n; i++) {
        if (trap)
            __asm__ volatile("int3");
        else
            __asm__ volatile("nop");
    }
    double t1 = now();
    printf("ns_per_iter %.2f\n", (t1 - t0) / n);
    return 0;
}
