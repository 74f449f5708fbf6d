/* The kernel worker pool: a fixed set of threads that split one op at a time.
 *
 * Design. ebb_pool_run publishes a job in one 64-bit "claim" word:
 * generation (24 bits) | task count (20 bits) | next unclaimed task (20 bits).
 * Workers and the calling thread claim task indices from that word with
 * compare-and-swap until none are left, so uneven tasks, or a core taken by
 * another process, balance themselves. The caller returns once all tasks have
 * FINISHED (a done counter), not once every worker has checked in: a worker
 * that was not scheduled in time finds no work left and never delays the op.
 *
 * Why everything sits in one word: a late worker may still hold an old claim
 * value while the caller already writes the next job's fn/arg. Its CAS can
 * only succeed if the word still reads "old generation, task i < count",
 * which means that old job is unfinished, so the caller has not started
 * writing the next one; the fn/arg it read before the CAS are therefore the
 * right ones (the fields are atomics so those early reads are well defined).
 * With the count kept outside the word, a stale worker could compare against
 * the NEW count and claim a task of the old generation, running it twice.
 * Jobs with more tasks than the count field holds run as several generations.
 *
 * Waiting. Decode calls this about 200 times per token with only microseconds
 * of serial work in between, so a condition-variable round trip per call
 * (tens of microseconds on a VM) would dominate. Workers therefore spin on the
 * claim word for a short while (SPIN_NS) after each job and only then sleep on
 * a condition variable; the caller waits for the last tasks the same way. The
 * sleep/wake handshakes are the Dekker pattern: a sleeper announces itself
 * before re-checking under the mutex, the publisher changes the state before
 * reading the announcement, both sequentially consistent, so one of them
 * always sees the other and no wake-up is lost.
 *
 * Trade-offs: spinning burns a core for up to SPIN_NS after each op, which is
 * the point during decode and stops soon when idle. The 24-bit generation
 * wraps after 16M jobs; a stale claim could only be mistaken for a new one by
 * a thread stalled for exactly a multiple of that many jobs with an identical
 * count and index. Only one thread may call ebb_pool_run on a pool at a time
 * (the engine thread); runs do not nest.
 */
#define _GNU_SOURCE
#include "kernels/backend.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

#define SPIN_NS 200000L        /* spin this long before sleeping (0.2 ms) */
#define MAX_THREADS 256

struct ebb_pool {
    int n_threads;             /* including the calling thread */
    pthread_t *workers;        /* n_threads - 1 of them */
    int n_started;
    uint32_t generation;       /* caller-side copy of the current generation */

    /* The current job, written by the caller before it publishes the claim.
     * Task j of a generation is task base + j of the caller's run of total. */
    _Atomic(ebb_task_fn) fn;
    _Atomic(void *) arg;
    atomic_int base, total;
    _Atomic uint64_t claim;    /* generation | count | next, see the top */
    atomic_int done;           /* tasks of the current job that have finished */
    atomic_int stop;

    pthread_mutex_t mu;
    pthread_cond_t wake;       /* workers sleep here between jobs */
    pthread_cond_t finished;   /* the caller sleeps here waiting for the last tasks */
    atomic_int sleepers;       /* workers inside (or entering) the wake wait */
    atomic_int caller_asleep;  /* the caller is inside (or entering) the finished wait */
};

static long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

#define GEN_BITS 24
#define COUNT_BITS 20
#define MAX_COUNT ((1 << COUNT_BITS) - 1)
#define GEN_MASK ((1u << GEN_BITS) - 1)

static uint32_t gen_of(uint64_t c) { return (uint32_t)(c >> (2 * COUNT_BITS)); }
static int count_of(uint64_t c) { return (int)((c >> COUNT_BITS) & MAX_COUNT); }
static int next_of(uint64_t c) { return (int)(c & MAX_COUNT); }
static uint64_t make_claim(uint32_t gen, int count)
{
    return ((uint64_t)gen << (2 * COUNT_BITS)) | ((uint64_t)count << COUNT_BITS);
}

/* Claims and runs tasks of job `gen` until none are left (or the job is gone). */
static void run_tasks(struct ebb_pool *p, uint32_t gen)
{
    uint64_t c = atomic_load(&p->claim);
    for (;;) {
        int count = count_of(c), i = next_of(c);
        if (gen_of(c) != gen || i >= count) return;
        /* Read before the CAS; the CAS succeeding proves they are this job's. */
        ebb_task_fn fn = atomic_load_explicit(&p->fn, memory_order_relaxed);
        void *arg = atomic_load_explicit(&p->arg, memory_order_relaxed);
        int base = atomic_load_explicit(&p->base, memory_order_relaxed);
        int total = atomic_load_explicit(&p->total, memory_order_relaxed);
        if (!atomic_compare_exchange_weak(&p->claim, &c, c + 1)) continue;  /* c reloaded */
        fn(arg, base + i, total);
        if (atomic_fetch_add(&p->done, 1) + 1 == count && atomic_load(&p->caller_asleep)) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->finished);
            pthread_mutex_unlock(&p->mu);
        }
        c = atomic_load(&p->claim);
    }
}

/* Spins, then sleeps, until the claim word carries a generation other than
 * seen (or the pool stops); returns that generation. */
static uint32_t wait_for_job(struct ebb_pool *p, uint32_t seen)
{
    long deadline = 0;
    for (int spins = 1;; spins++) {
        uint32_t g = gen_of(atomic_load(&p->claim));
        if (g != seen || atomic_load(&p->stop)) return g;
        cpu_relax();
        if (spins % 64 == 0) {
            long t = now_ns();
            if (deadline == 0) deadline = t + SPIN_NS;
            else if (t > deadline) break;
        }
    }
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add(&p->sleepers, 1);
    uint32_t g;
    while ((g = gen_of(atomic_load(&p->claim))) == seen && !atomic_load(&p->stop))
        pthread_cond_wait(&p->wake, &p->mu);
    atomic_fetch_sub(&p->sleepers, 1);
    pthread_mutex_unlock(&p->mu);
    return g;
}

static void *worker_main(void *vp)
{
    struct ebb_pool *p = vp;
    uint32_t seen = 0;
    for (;;) {
        seen = wait_for_job(p, seen);
        if (atomic_load(&p->stop)) break;
        run_tasks(p, seen);
    }
    return NULL;
}

static int online_cores(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (n > MAX_THREADS ? MAX_THREADS : (int)n);
}

struct ebb_pool *ebb_pool_create(int n_threads)
{
    if (n_threads <= 0) n_threads = online_cores();
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    struct ebb_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n_threads = n_threads;
    atomic_init(&p->fn, NULL);
    atomic_init(&p->arg, NULL);
    atomic_init(&p->base, 0);
    atomic_init(&p->total, 0);
    atomic_init(&p->claim, 0);
    atomic_init(&p->done, 0);
    atomic_init(&p->stop, 0);
    atomic_init(&p->sleepers, 0);
    atomic_init(&p->caller_asleep, 0);
    if (pthread_mutex_init(&p->mu, NULL)) { free(p); return NULL; }
    if (pthread_cond_init(&p->wake, NULL)) goto fail_mu;
    if (pthread_cond_init(&p->finished, NULL)) goto fail_wake;
    if (n_threads > 1) {
        p->workers = calloc((size_t)n_threads - 1, sizeof *p->workers);
        if (!p->workers) goto fail_finished;
    }
    for (int i = 0; i < n_threads - 1; i++) {
        int rc = pthread_create(&p->workers[i], NULL, worker_main, p);
        if (rc) {
            fprintf(stderr, "ebb: cannot start kernel worker thread %d: error %d\n", i, rc);
            ebb_pool_destroy(p);     /* joins the ones already started */
            return NULL;
        }
        p->n_started++;
    }
    return p;

fail_finished:
    pthread_cond_destroy(&p->finished);
fail_wake:
    pthread_cond_destroy(&p->wake);
fail_mu:
    pthread_mutex_destroy(&p->mu);
    free(p);
    return NULL;
}

void ebb_pool_destroy(struct ebb_pool *p)
{
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n_started; i++) pthread_join(p->workers[i], NULL);
    free(p->workers);
    pthread_cond_destroy(&p->finished);
    pthread_cond_destroy(&p->wake);
    pthread_mutex_destroy(&p->mu);
    free(p);
}

int ebb_pool_threads(const struct ebb_pool *p) { return p ? p->n_threads : 1; }

/* Runs tasks [base, base + count) of a run of total as one generation. */
static void run_generation(struct ebb_pool *p, ebb_task_fn fn, void *arg, int base, int count, int total)
{
    atomic_store_explicit(&p->fn, fn, memory_order_relaxed);
    atomic_store_explicit(&p->arg, arg, memory_order_relaxed);
    atomic_store_explicit(&p->base, base, memory_order_relaxed);
    atomic_store_explicit(&p->total, total, memory_order_relaxed);
    atomic_store_explicit(&p->done, 0, memory_order_relaxed);
    uint32_t gen = p->generation = (p->generation + 1) & GEN_MASK;
    if (gen == 0) gen = p->generation = 1;          /* 0 is what fresh workers have "seen" */
    atomic_store(&p->claim, make_claim(gen, count)); /* publishes the job (seq_cst) */
    if (atomic_load(&p->sleepers) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->wake);
        pthread_mutex_unlock(&p->mu);
    }

    run_tasks(p, gen);

    /* Wait for tasks other threads are still running: spin first, then sleep. */
    long deadline = 0;
    for (int spins = 1; atomic_load(&p->done) < count; spins++) {
        cpu_relax();
        if (spins % 64) continue;
        long t = now_ns();
        if (deadline == 0) { deadline = t + SPIN_NS; continue; }
        if (t < deadline) continue;
        pthread_mutex_lock(&p->mu);
        atomic_store(&p->caller_asleep, 1);
        while (atomic_load(&p->done) < count) pthread_cond_wait(&p->finished, &p->mu);
        atomic_store(&p->caller_asleep, 0);
        pthread_mutex_unlock(&p->mu);
        break;
    }
}

void ebb_pool_run(struct ebb_pool *p, ebb_task_fn fn, void *arg, int n)
{
    if (n <= 0) return;
    if (!p || p->n_threads == 1 || n == 1) {        /* nothing to share: stay on this thread */
        for (int i = 0; i < n; i++) fn(arg, i, n);
        return;
    }
    for (int base = 0; base < n; base += MAX_COUNT)
        run_generation(p, fn, arg, base, n - base < MAX_COUNT ? n - base : MAX_COUNT, n);
}
