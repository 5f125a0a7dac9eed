/* The kernels' worker-thread pool (threads.c): the calling thread plus helpers share a job's chunks.
   Declared outside the variants' hidden-visibility block (system.h includes this), defined once. */
#ifndef PARLEY_THREADS_H
#define PARLEY_THREADS_H

/* One chunk of a job: a kernel's slice of independent outputs (rows, heads), arithmetic per output
   unchanged, so the result is bitwise the same whoever runs which chunk. */
typedef void (*parley_chunk_fn)(void *ctx, long chunk);

/* Run fn(ctx, 0..chunks-1), each exactly once, on the caller and the pool's helpers; returns when all
   are done. Serial when the pool has one thread, chunks < 2, or another job is running (nested or
   from another thread). */
void parley_parallel_for(parley_chunk_fn fn, void *ctx, long chunks);

/* parley_parallel_for for jobs whose chunks each take milliseconds (prefill attention, weight expansion): shared
   with the helpers even while the pool backs off after a stall (it exists for the short decode jobs), and its
   own stalls start no backoff. Same results as parley_parallel_for. */
void parley_parallel_for_heavy(parley_chunk_fn fn, void *ctx, long chunks);

/* Threads a job uses (caller included): PARLEY_THREADS, else min(available cores, 2). */
long parley_threads(void);

/* Set the thread count (1..PARLEY_MAX_THREADS; 0: back to the default; tests, PARLEY_THREADS checked by the
   Python loader): 0 done, -1 refused. */
int parley_set_threads(long n);

/* Jobs of fewer multiply-adds than this stay on the caller (the hand-off would cost more than the work):
   65536 by default; tests set 0 to thread even the tiny model's kernels. */
long parley_min_work(void);
void parley_set_min_work(long work);

/* Counters since load, into out[4]: jobs shared with helpers, chunks the helpers ran, stalls (a helper
   descheduled mid-chunk), jobs run alone while backing off after a stall. */
void parley_pool_stats(long *out);

/* Run the next `jobs` light jobs on the caller alone, as after a stall (tests: heavy jobs stay shared). */
void parley_pool_back_off(long jobs);

#define PARLEY_MAX_THREADS 16

#endif
