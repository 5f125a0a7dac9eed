/* Quantized matrix-vector products over MLX's 4-bit and 8-bit layouts (group 32), read straight from the
   packed weights: decode is memory-bound and these read 4-8x fewer bytes than an fp32 gemv.
   q4_gemv/q8_gemv: one row (a decode step). q4_rows/q8_rows: up to 8 rows at once (a scene's speakers),
   each group of weights loaded and converted once for all rows; per row bitwise the one-row result
   (one body in quant_rows.h). */
#include "kernels.h"
#include "quant_rows.h"
#include "threads.h"

/* 1 when a vector body of these kernels was compiled in (the scalar one is slower than an fp32 BLAS gemv). */
int KFN(q4_fast)(void) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
    return 1;
#else
    return 0;
#endif
}

/* B rows of x (K floats apart) into y (O floats apart), B <= 8: the body specialised for each B. */
#define QROWS_SWITCH(body, B, ...) \
    switch (B) { \
    case 1: body(__VA_ARGS__, 1); break; case 2: body(__VA_ARGS__, 2); break; \
    case 3: body(__VA_ARGS__, 3); break; case 4: body(__VA_ARGS__, 4); break; \
    case 5: body(__VA_ARGS__, 5); break; case 6: body(__VA_ARGS__, 6); break; \
    case 7: body(__VA_ARGS__, 7); break; case 8: body(__VA_ARGS__, 8); break; \
    default: break; }

/* One threaded gemv job: outputs split into chunks of `step` rows (threads.c), each output's arithmetic
   the same on any thread, so the result is bitwise the single-thread one. */
struct qrows_job {
    const unsigned char *w;
    const float *s, *b, *x, *xe, *xo, *xs;
    float *y;
    long O, K, B, step;
};

static void q4_rows_chunk(void *arg, long i) {
    const struct qrows_job *j = arg;
    long o0 = i * j->step, o1 = o0 + j->step < j->O ? o0 + j->step : j->O;
    QROWS_SWITCH(q4_rows_body, j->B, j->w, j->s, j->b, j->xe, j->xo, j->xs, j->y, j->O, j->K, o0, o1)
}

static void q8_rows_chunk(void *arg, long i) {
    const struct qrows_job *j = arg;
    long o0 = i * j->step, o1 = o0 + j->step < j->O ? o0 + j->step : j->O;
    QROWS_SWITCH(q8_rows_body, j->B, j->w, j->s, j->b, j->x, j->xs, j->y, j->O, j->K, o0, o1)
}

/* Rows per chunk: a few chunks per thread (a late or busy helper leaves its share to the caller), at
   least 16 rows; all O (the caller alone) under parley_min_work() weights x rows. */
static long qrows_step(long O, long K, long B) {
    long threads = parley_threads();
    if (threads < 2 || O * K * B < parley_min_work()) return O;
    long chunks = threads * 4, min_rows = 16;
    long step = (O + chunks - 1) / chunks;
    return step < min_rows ? min_rows : step;
}

void KFN(q4_rows)(const unsigned char *w, const float *s, const float *b, const float *x, float *y,
             long O, long K, long B) {
    if (B < 1 || B > QROWS_MAX || O < 1) return;
    long G = K / 32, H = K / 2;
    float xe[B * H], xo[B * H], xs[B * G];
    for (long r = 0; r < B; r++) q4_split_row(x + r * K, K, xe + r * H, xo + r * H, xs + r * G);
    struct qrows_job job = {w, s, b, x, xe, xo, xs, y, O, K, B, qrows_step(O, K, B)};
    parley_parallel_for(q4_rows_chunk, &job, (O + job.step - 1) / job.step);
}

void KFN(q8_rows)(const unsigned char *w, const float *s, const float *b, const float *x, float *y,
             long O, long K, long B) {
    if (B < 1 || B > QROWS_MAX || O < 1) return;
    long G = K / 32;
    float xs[B * G];
    for (long r = 0; r < B; r++) q8_group_sums(x + r * K, K, xs + r * G);
    struct qrows_job job = {w, s, b, x, NULL, NULL, xs, y, O, K, B, qrows_step(O, K, B)};
    parley_parallel_for(q8_rows_chunk, &job, (O + job.step - 1) / job.step);
}

void KFN(q4_gemv)(const unsigned char *w, const float *s, const float *b, const float *x, float *y, long O, long K) {
    KFN(q4_rows)(w, s, b, x, y, O, K, 1);
}

void KFN(q8_gemv)(const unsigned char *w, const float *s, const float *b, const float *x, float *y, long O, long K) {
    KFN(q8_rows)(w, s, b, x, y, O, K, 1);
}
