/* Quantized matrix-vector products over MLX's 4-bit and 8-bit layouts (group 32), read straight from the
   packed weights: decode is memory-bound and these read 4-8x fewer bytes than an fp32 gemv.
   q4_gemv/q8_gemv: one row (a decode step). q4_rows/q8_rows: up to 8 rows at once (a scene's speakers),
   each group of weights loaded and converted once for all rows; per row bitwise the one-row result
   (one body in quant_rows.h). */
#include "quant_rows.h"

/* 1 when the vector path of these kernels was compiled in (slower than an fp32 BLAS gemv otherwise). */
int q4_fast(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

int q4_rows_fast(void) { return q4_fast(); }

/* B rows of x (K floats apart) into y (O floats apart), B <= 8: the body specialised for each B. */
#define QROWS_SWITCH(body, B, ...) \
    switch (B) { \
    case 1: body(__VA_ARGS__, 1); break; case 2: body(__VA_ARGS__, 2); break; \
    case 3: body(__VA_ARGS__, 3); break; case 4: body(__VA_ARGS__, 4); break; \
    case 5: body(__VA_ARGS__, 5); break; case 6: body(__VA_ARGS__, 6); break; \
    case 7: body(__VA_ARGS__, 7); break; case 8: body(__VA_ARGS__, 8); break; \
    default: break; }

void q4_rows(const unsigned char *w, const float *s, const float *b, const float *x, float *y,
             long O, long K, long B) {
    if (B < 1 || B > QROWS_MAX) return;
    long G = K / 32, H = K / 2;
    float xe[B * H], xo[B * H], xs[B * G];
    for (long r = 0; r < B; r++) q4_split_row(x + r * K, K, xe + r * H, xo + r * H, xs + r * G);
    QROWS_SWITCH(q4_rows_body, B, w, s, b, xe, xo, xs, y, O, K)
}

void q8_rows(const unsigned char *w, const float *s, const float *b, const float *x, float *y,
             long O, long K, long B) {
    if (B < 1 || B > QROWS_MAX) return;
    long G = K / 32;
    float xs[B * G];
    for (long r = 0; r < B; r++) q8_group_sums(x + r * K, K, xs + r * G);
    QROWS_SWITCH(q8_rows_body, B, w, s, b, x, xs, y, O, K)
}

void q4_gemv(const unsigned char *w, const float *s, const float *b, const float *x, float *y, long O, long K) {
    q4_rows(w, s, b, x, y, O, K, 1);
}

void q8_gemv(const unsigned char *w, const float *s, const float *b, const float *x, float *y, long O, long K) {
    q8_rows(w, s, b, x, y, O, K, 1);
}
