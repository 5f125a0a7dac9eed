/* A quantized layer's fp32 weight, built once for the BLAS prefill path (app/model/cpu_linear.py), on the
   worker pool.

   MLX's CPU `dequantize` runs as a chain of single-threaded element-wise passes (shift, mask, convert,
   multiply, add) over the whole weight: for the embedded model's 540 MB of fp32 weights that was ~1 s of
   the first long prefill. Here one pass per row block writes each weight as w = s * q + b in fp32, the
   row blocks shared by the pool's threads.

   Bitwise MLX's, which multiplies then adds in two element-wise ops, each rounded in fp32: the chunk is
   compiled with fp-contract off, so the compiler never fuses s * q + b into one FMA (one rounding), which
   would differ wherever s * q is not exact (fp32 scales; float16 ones times 4/8-bit codes are exact).
   tests/test_kernels.py checks it bitwise against mx.dequantize with full-precision fp32 scales, per variant. */
#include "kernels.h"

#define DQ_ROWS 16 /* rows per chunk of the pool */

typedef struct {
    const unsigned char *w;
    const float *s, *b;
    float *out;
    long O, K, group, bits;
} dq_t;

__attribute__((optimize("fp-contract=off"))) static void dq_chunk(void *ctx, long i) {
    const dq_t *a = ctx;
    long K = a->K, groups = K / a->group, row_bytes = K * a->bits / 8;
    long end = (i + 1) * DQ_ROWS < a->O ? (i + 1) * DQ_ROWS : a->O;
    for (long o = i * DQ_ROWS; o < end; o++) {
        const unsigned char *w = a->w + o * row_bytes;
        float *out = a->out + o * K;
        for (long g = 0; g < groups; g++) {
            float s = a->s[o * groups + g], b = a->b[o * groups + g];
            float *y = out + g * a->group;
            if (a->bits == 4) {
                const unsigned char *c = w + g * a->group / 2;
                #pragma omp simd
                for (long j = 0; j < a->group / 2; j++) {
                    y[2 * j] = s * (float)(c[j] & 15) + b;
                    y[2 * j + 1] = s * (float)(c[j] >> 4) + b;
                }
            } else {
                const unsigned char *c = w + g * a->group;
                #pragma omp simd
                for (long j = 0; j < a->group; j++) y[j] = s * (float)c[j] + b;
            }
        }
    }
}

/* out[O][K] = s * q + b for MLX's affine layout: row o's codes are K * bits / 8 bytes (4-bit: element j in
   byte j / 2, low nibble first), its scales and biases K / group fp32 values. bits 4 or 8, group even and
   dividing K. Returns 0, or -1 for a layout it does not take (nothing written). */
int KFN(dequantize_rows)(const unsigned char *w, const float *s, const float *b, float *out, long O, long K,
                         long group, long bits) {
    if ((bits != 4 && bits != 8) || group < 2 || group % 2 || K % group || O < 1) return -1;
    dq_t a = {.w = w, .s = s, .b = b, .out = out, .O = O, .K = K, .group = group, .bits = bits};
    parley_parallel_for_heavy(dq_chunk, &a, (O + DQ_ROWS - 1) / DQ_ROWS);
    return 0;
}
