/* A persistent worker pool for the decode kernels: the caller and (threads - 1) helpers split a job's
   chunks (the 4/8-bit gemv's output rows, the block attention's heads and channel slices).

   Decode calls the gemv ~120 times a token, 20-500 us each, so a hand-off must cost ~1 us: a helper
   spins (pause) for PARLEY_THREAD_SPIN_US (default 200 us) after its last chunk, then sleeps (a futex on Linux),
   so an idle app burns no CPU and a spinning helper does not fight OpenBLAS's prefill threads for long.
   Chunks are claimed one at a time from a shared counter (generation in the high 32 bits, next chunk in
   the low), so a helper that is asleep, late or descheduled (a busy machine) only means the caller
   claims more chunks itself; a job never waits for a helper that has not started. Which thread ran a
   chunk never changes its numbers: kernels split only independent outputs. */
#define _GNU_SOURCE
#include "threads.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#if defined(__linux__) && !defined(PARLEY_COND_WAIT)
#include <linux/futex.h>
#include <sys/syscall.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() do { } while (0)
#endif

#define LOAD(p) __atomic_load_n(p, __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n(p, v, __ATOMIC_RELEASE)

/* A stall: the caller waited this long for a helper's chunk (the helper was descheduled: more runnable
   threads than cores). The next `backoff` jobs then run on the caller alone (same results), doubling up
   to 16384 jobs while stalls continue, so an overloaded machine does not make decode slower than one
   thread; a job without a stall resets it. */
#define STALL_NS 100000L
#define BACKOFF_MIN 64L
#define BACKOFF_MAX 16384L

static struct {
    parley_chunk_fn fn;      /* the current job (valid while its generation is in `ticket`) */
    void *ctx;
    long chunks;
    uint64_t ticket;         /* generation << 32 | next unclaimed chunk */
    long done;               /* chunks of the current job finished */
    uint32_t generation;     /* futex word: the latest job's generation */
    int sleepers;            /* helpers asleep (or about to be) on `generation` */
    int busy;                /* a job is running: a second caller runs its job serially */
    long threads;            /* wanted, caller included */
    long min_work;           /* smaller jobs (multiply-adds) stay on the caller */
    long started;            /* helpers running */
    long spin_ns;
    long serial_left;        /* jobs to run on the caller alone after a stall (backoff, see below) */
    long backoff;            /* the next stall's serial_left: doubles on each stall, reset by a good job */
    long stats[4];           /* jobs shared, chunks run by helpers, stalls, jobs run alone by backoff */
    pthread_mutex_t start_lock;
} pool = { .threads = 0, .min_work = 1L << 16, .backoff = BACKOFF_MIN, .start_lock = PTHREAD_MUTEX_INITIALIZER };

/* Sleep while *word == seen, and wake every sleeper: a futex on Linux; elsewhere (macOS builds the
   kernels too) a mutex and condition variable. Both may return early; callers re-check the word. */
#if defined(__linux__) && !defined(PARLEY_COND_WAIT)
static void wait_while(uint32_t *word, uint32_t seen) {
    syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
}

static void wake_all(uint32_t *word) {
    syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
}
#else
static pthread_mutex_t wait_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wait_cond = PTHREAD_COND_INITIALIZER;

static void wait_while(uint32_t *word, uint32_t seen) {
    pthread_mutex_lock(&wait_lock);
    while (__atomic_load_n(word, __ATOMIC_SEQ_CST) == seen) pthread_cond_wait(&wait_cond, &wait_lock);
    pthread_mutex_unlock(&wait_lock);
}

static void wake_all(uint32_t *word) {
    (void)word;  /* the new value is stored before this lock is taken: a waiter either saw it or is waiting */
    pthread_mutex_lock(&wait_lock);
    pthread_cond_broadcast(&wait_cond);
    pthread_mutex_unlock(&wait_lock);
}
#endif

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* Claim and run chunks of generation `gen` until none is left (or a newer job replaced it). */
static void run_chunks(uint32_t gen, int helper) {
    for (;;) {
        uint64_t t = LOAD(&pool.ticket);
        if ((uint32_t)(t >> 32) != gen) return;
        long i = (long)(uint32_t)t;
        parley_chunk_fn fn = __atomic_load_n(&pool.fn, __ATOMIC_RELAXED);
        void *ctx = __atomic_load_n(&pool.ctx, __ATOMIC_RELAXED);
        long n = __atomic_load_n(&pool.chunks, __ATOMIC_RELAXED);
        if (i >= n) return;
        /* the claim succeeds only while the job is still generation `gen` with chunk i unclaimed, so
           fn/ctx/n read above are that job's (a job's fields change only after all its chunks are done) */
        if (!__atomic_compare_exchange_n(&pool.ticket, &t, t + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) continue;
        fn(ctx, i);
        __atomic_fetch_add(&pool.done, 1, __ATOMIC_RELEASE);
        if (helper) __atomic_fetch_add(&pool.stats[1], 1, __ATOMIC_RELAXED);
    }
}

static void *helper_main(void *arg) {
    (void)arg;
    uint32_t seen = LOAD(&pool.generation);
    for (;;) {
        long until = now_ns() + pool.spin_ns;
        for (int k = 0; LOAD(&pool.generation) == seen; k++) {
            CPU_RELAX();
            if ((k & 63) == 63 && now_ns() > until) {
                __atomic_fetch_add(&pool.sleepers, 1, __ATOMIC_SEQ_CST);
                if (__atomic_load_n(&pool.generation, __ATOMIC_SEQ_CST) == seen)
                    wait_while(&pool.generation, seen);
                __atomic_fetch_sub(&pool.sleepers, 1, __ATOMIC_SEQ_CST);
                until = now_ns() + pool.spin_ns;
            }
        }
        seen = LOAD(&pool.generation);
        run_chunks(seen, 1);
    }
    return NULL;
}

static long env_long(const char *name, long fallback, long lo, long hi) {
    const char *s = getenv(name);
    if (!s || !*s) return fallback;
    char *end;
    long v = strtol(s, &end, 10);
    return (*end || v < lo || v > hi) ? fallback : v;
}

static long default_threads(void) {
#if defined(__linux__)
    cpu_set_t set;
    long cores = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : sysconf(_SC_NPROCESSORS_ONLN);
#else
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
#endif
    if (cores < 1) cores = 1;
    return env_long("PARLEY_THREADS", cores < 2 ? cores : 2, 1, PARLEY_MAX_THREADS);
}

static void after_fork_in_child(void) { pool.started = 0; pool.sleepers = 0; pool.busy = 0; }

long parley_threads(void) {
    long n = __atomic_load_n(&pool.threads, __ATOMIC_ACQUIRE);
    if (n == 0) {
        n = default_threads();
        long zero = 0;
        __atomic_compare_exchange_n(&pool.threads, &zero, n, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
        n = __atomic_load_n(&pool.threads, __ATOMIC_ACQUIRE);
    }
    return n;
}

int parley_set_threads(long n) {
    if (n == 0) n = default_threads();
    if (n < 1 || n > PARLEY_MAX_THREADS) return -1;
    __atomic_store_n(&pool.threads, n, __ATOMIC_RELEASE);
    pool.serial_left = 0; /* a fresh start: no backoff left from earlier stalls */
    pool.backoff = BACKOFF_MIN;
    return 0;
}

long parley_min_work(void) { return __atomic_load_n(&pool.min_work, __ATOMIC_RELAXED); }

void parley_set_min_work(long work) { __atomic_store_n(&pool.min_work, work < 0 ? 0 : work, __ATOMIC_RELAXED); }

/* Start helpers up to `want - 1` (never stopped: a smaller count just leaves some asleep). */
static long ensure_helpers(long want) {
    if (LOAD(&pool.started) >= want - 1) return want;
    pthread_mutex_lock(&pool.start_lock);
    static int registered;
    if (!registered) {
        pthread_atfork(NULL, NULL, after_fork_in_child);
        pool.spin_ns = env_long("PARLEY_THREAD_SPIN_US", 200, 0, 100000) * 1000L;
        registered = 1;
    }
    while (pool.started < want - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&t, &attr, helper_main, NULL);
        pthread_attr_destroy(&attr);
        if (failed) break;
        STORE(&pool.started, pool.started + 1);
    }
    long have = pool.started + 1;
    pthread_mutex_unlock(&pool.start_lock);
    return have < want ? have : want;
}

static void run_serial(parley_chunk_fn fn, void *ctx, long chunks) {
    for (long i = 0; i < chunks; i++) fn(ctx, i);
}

/* heavy: chunks of milliseconds (prefill), where a 100 us stall is noise: never run alone for backoff, and a
   stall starts none (on a busy machine the backoff would otherwise leave a whole prefill on one thread). */
static void parallel_for(parley_chunk_fn fn, void *ctx, long chunks, int heavy) {
    long threads = parley_threads();
    int expected = 0;
    if (chunks < 2 || threads < 2 ||
        !__atomic_compare_exchange_n(&pool.busy, &expected, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
        run_serial(fn, ctx, chunks);
        return;
    }
    if ((!heavy && pool.serial_left > 0) || ensure_helpers(threads) < 2) {
        if (!heavy && pool.serial_left > 0) {
            pool.serial_left--;
            __atomic_fetch_add(&pool.stats[3], 1, __ATOMIC_RELAXED);
        }
        run_serial(fn, ctx, chunks);
        STORE(&pool.busy, 0);
        return;
    }
    uint32_t gen = pool.generation + 1;
    __atomic_store_n(&pool.fn, fn, __ATOMIC_RELAXED);
    __atomic_store_n(&pool.ctx, ctx, __ATOMIC_RELAXED);
    __atomic_store_n(&pool.chunks, chunks, __ATOMIC_RELAXED);
    __atomic_store_n(&pool.done, 0, __ATOMIC_RELAXED);
    STORE(&pool.ticket, (uint64_t)gen << 32);
    __atomic_store_n(&pool.generation, gen, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&pool.sleepers, __ATOMIC_SEQ_CST) > 0) wake_all(&pool.generation);
    run_chunks(gen, 0);
    /* the chunks the helpers claimed: short, unless a helper was descheduled (then give it the core) */
    long t0 = 0, stalled = 0;
    for (long k = 1; LOAD(&pool.done) < chunks; k++) {
        CPU_RELAX();
        if ((k & 63) == 0) {
            long t = now_ns();
            if (t0 == 0) t0 = t;
            else if (t - t0 > STALL_NS) stalled = 1;
            if (stalled) sched_yield();
        }
    }
    __atomic_fetch_add(&pool.stats[0], 1, __ATOMIC_RELAXED);
    if (heavy) {
        /* neither a stall nor a clean run says anything about the short decode jobs' hand-offs */
    } else if (stalled) {
        __atomic_fetch_add(&pool.stats[2], 1, __ATOMIC_RELAXED);
        pool.serial_left = pool.backoff;
        pool.backoff = pool.backoff * 2 > BACKOFF_MAX ? BACKOFF_MAX : pool.backoff * 2;
    } else {
        pool.backoff = BACKOFF_MIN;
    }
    STORE(&pool.busy, 0);
}

void parley_parallel_for(parley_chunk_fn fn, void *ctx, long chunks) { parallel_for(fn, ctx, chunks, 0); }

void parley_parallel_for_heavy(parley_chunk_fn fn, void *ctx, long chunks) { parallel_for(fn, ctx, chunks, 1); }

void parley_pool_back_off(long jobs) { pool.serial_left = jobs < 0 ? 0 : jobs; }

void parley_pool_stats(long *out) {
    for (int i = 0; i < 4; i++) out[i] = __atomic_load_n(&pool.stats[i], __ATOMIC_RELAXED);
}
