/* pyprobes' built-in demo target: a few functions called a known number of times by two
 * threads, which then prints its own counts so pyprobes' counts can be checked against them.
 *
 *   demo_add     a leaf starting with a plain ALU/move instruction   -> boosted probe
 *   demo_work    starts with a nop: gcc pads its entry with 5 bytes   -> emulated probe
 *                of nops (patchable_function_entry, as the kernel's
 *                ftrace entries are), which the tracer just skips
 *   demo_tick    starts with a `lock`-prefixed add                   -> stepped probe
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#define THREADS 2

static long rounds = 20000;
volatile long demo_sink;
long demo_ticks;
static long calls_add[THREADS], calls_work[THREADS];

__attribute__((noinline)) long demo_add(long a, long b) {
    return a * 3 + b;
}

__attribute__((noinline)) void demo_tick(void) {
    __atomic_fetch_add(&demo_ticks, 1, __ATOMIC_SEQ_CST);
}

__attribute__((noinline, patchable_function_entry(5))) long demo_work(long id, long i) {
    long x = demo_add(i, id);
    calls_add[id]++;
    if (i % 10 == 0)
        demo_tick();
    demo_sink = x + demo_add(x, i);
    calls_add[id]++;
    return demo_sink;
}

static void *worker(void *arg) {
    long id = (long)arg;
    for (long i = 0; i < rounds; i++) {
        demo_work(id, i);
        calls_work[id]++;
    }
    return NULL;
}

int main(int argc, char **argv) {
    pthread_t t[THREADS];
    if (argc > 1)
        rounds = atol(argv[1]);
    for (long i = 0; i < THREADS; i++)
        pthread_create(&t[i], NULL, worker, (void *)i);
    long add = 0, work = 0;
    for (long i = 0; i < THREADS; i++) {
        pthread_join(t[i], NULL);
        add += calls_add[i];
        work += calls_work[i];
    }
    printf("demo: %d threads called demo_work %ld times, demo_add %ld times, demo_tick %ld times\n",
           THREADS, work, add, demo_ticks);
    return 0;
}
