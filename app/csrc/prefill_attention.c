/* The attention of a prefill chunk in one call: softmax(q K^T) V for every query head and row, causal or not,
   on the worker pool (threads.c), written straight into the (L, H * Dv) layout o_proj reads.

   It replaces, per layer, one BLAS sgemm pair and an MLX eval for each head and 256-row tile: those small
   sgemms (K = 64 for the scores, N = 64 for P V) ran at a third of BLAS's speed on the model's own matmuls,
   the softmax ran on one core between them, and each tile paid a hand-off. Here a chunk of the pool is
   (query head, tile of R rows): its scores S[R][seen] (the keys up to its last row's position) stay in the
   thread's cache between the three steps, computed by register-tiled loops over GCC vector types (one
   source: 16-wide on AVX-512, 8-wide on AVX2, SSE on the portable build):

     1. S = Q K^T: MR query rows x NR keys of accumulators, over the keys packed D-major once per call;
     2. each row's softmax exactly as causal_softmax computes it (max, expf, sum, times 1/sum, zeros past
        the row's last key);
     3. O = P V: MR rows x the value channels, summed over the keys in order.

   Same products as the BLAS path, summed in another order: equal within fp32 rounding
   (tests/test_prefill_attention.py, every variant against a float64 reference). Which thread runs a chunk
   never changes its numbers. */
#include "kernels.h"

#if defined(__AVX512F__)
#define PA_VW 16   /* floats per vector */
#define PA_MR 6    /* query rows of the score and value tiles */
#define PA_NCV 4   /* value-tile vectors per row: 64 channels */
#else
#define PA_VW 8
#define PA_MR 6
#define PA_NCV 2   /* AVX2: 6 x 2 accumulators + 2 loads + a broadcast fit 16 registers */
#endif
#define PA_NR (2 * PA_VW)           /* keys per score tile (two vectors) */
#define PA_VC (PA_NCV * PA_VW)      /* value channels per value tile */
#define PA_SCORES_FLOATS (128 * 1024) /* a chunk's scores, ~512 KB: R = this / the keys it sees */

typedef float pa_vec __attribute__((vector_size(PA_VW * 4)));
typedef float pa_uvec __attribute__((vector_size(PA_VW * 4), aligned(4)));  /* unaligned loads and stores */

typedef struct {
    const float *q, *kp, *v;
    float *out;
    long H, G, L, T, Dk, Dv, offset, causal, R, tiles, q_hs, v_hs, kp_hs, o_rs;
    int failed; /* a chunk found no memory for its scores */
} pa_t;

/* Keys of one KV head packed for the score tiles: block b holds keys b*NR .. b*NR+NR-1 as Dk rows of NR
   floats (key-major within the row), zero past T. */
static void pa_pack_keys(const float *k, long T, long Dk, float *kp) {
    long blocks = (T + PA_NR - 1) / PA_NR;
    for (long b = 0; b < blocks; b++) {
        float *dst = kp + b * Dk * PA_NR;
        for (long j = 0; j < PA_NR; j++) {
            long t = b * PA_NR + j;
            if (t < T) {
                const float *src = k + t * Dk;
                for (long d = 0; d < Dk; d++) dst[d * PA_NR + j] = src[d];
            } else {
                for (long d = 0; d < Dk; d++) dst[d * PA_NR + j] = 0.f;
            }
        }
    }
}

/* S[MR][NR] tile at column block b: rows of qt (MR x Dk, contiguous), keys of packed block kb. */
static inline void pa_score_tile(const float *qt, long Dk, const float *kb, float *s, long ldS) {
    pa_vec acc[PA_MR][2];
    for (int r = 0; r < PA_MR; r++) acc[r][0] = acc[r][1] = (pa_vec){0};
    for (long d = 0; d < Dk; d++) {
        pa_vec k0 = *(const pa_vec *)(kb + d * PA_NR), k1 = *(const pa_vec *)(kb + d * PA_NR + PA_VW);
        for (int r = 0; r < PA_MR; r++) {
            pa_vec qv = (pa_vec){0} + qt[r * Dk + d];
            acc[r][0] += qv * k0;
            acc[r][1] += qv * k1;
        }
    }
    for (int r = 0; r < PA_MR; r++) {
        *(pa_uvec *)(s + r * ldS) = acc[r][0];
        *(pa_uvec *)(s + r * ldS + PA_VW) = acc[r][1];
    }
}

/* O[MR][VC] at channel c0 += P[MR][0..n) V[0..n)[c0..c0+VC) (rows of V v_rs floats apart). */
static inline void pa_value_tile(const float *p, long ldP, const float *v, long Dv, long n, float *o, long ldO) {
    pa_vec acc[PA_MR][PA_NCV];
    for (int r = 0; r < PA_MR; r++)
        for (int c = 0; c < PA_NCV; c++) acc[r][c] = (pa_vec){0};
    for (long j = 0; j < n; j++) {
        pa_vec vv[PA_NCV];
        for (int c = 0; c < PA_NCV; c++) vv[c] = *(const pa_uvec *)(v + j * Dv + c * PA_VW);
        for (int r = 0; r < PA_MR; r++) {
            pa_vec pv = (pa_vec){0} + p[r * ldP + j];
            for (int c = 0; c < PA_NCV; c++) acc[r][c] += pv * vv[c];
        }
    }
    for (int r = 0; r < PA_MR; r++)
        for (int c = 0; c < PA_NCV; c++) *(pa_uvec *)(o + r * ldO + c * PA_VW) = acc[r][c];
}

/* The thread's working memory for one chunk, grown as needed: scores, query rows, output rows. */
static float *pa_buffer(long n) {
    static __thread float *buf;
    static __thread long cap;
    if (n > cap) {
        free(buf);
        buf = aligned_alloc(64, sizeof(float) * ((n + 15) / 16 * 16));
        cap = buf ? n : 0;
    }
    return buf;
}

static void pa_chunk(void *ctx, long i) {
    pa_t *a = ctx;
    long tile = a->tiles - 1 - i / a->H, h = i % a->H;  /* the longest tiles (last rows) first */
    long l0 = tile * a->R, rows = a->L - l0 < a->R ? a->L - l0 : a->R;
    long seen = a->causal ? a->offset + l0 + rows : a->T;
    if (seen > a->T) seen = a->T;
    long rpad = (rows + PA_MR - 1) / PA_MR * PA_MR, cols = (seen + PA_NR - 1) / PA_NR * PA_NR;
    long Dk = a->Dk, Dv = a->Dv, vfast = Dv % PA_VC == 0;
    float *S = pa_buffer(rpad * cols + rpad * Dk + (vfast ? rpad * Dv : 0));
    if (!S) {  /* no memory: the call reports it and its caller computes the attention another way */
        __atomic_store_n(&a->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    float *qt = S + rpad * cols, *ot = qt + rpad * Dk;
    const float *qh = a->q + h * a->q_hs + l0 * Dk;
    memcpy(qt, qh, sizeof(float) * rows * Dk);
    memset(qt + rows * Dk, 0, sizeof(float) * (rpad - rows) * Dk);
    const float *kp = a->kp + (h / a->G) * a->kp_hs, *vh = a->v + (h / a->G) * a->v_hs;
    for (long r0 = 0; r0 < rpad; r0 += PA_MR)
        for (long b = 0; b < cols / PA_NR; b++)
            pa_score_tile(qt + r0 * Dk, Dk, kp + b * Dk * PA_NR, S + r0 * cols + b * PA_NR, cols);
    for (long r = 0; r < rpad; r++) {
        long n = r >= rows ? 0 : a->causal ? a->offset + l0 + r + 1 : seen;
        if (n > seen) n = seen;
        if (r < rows) softmax_row(S + r * cols, n, seen); /* attention.c */
        else memset(S + r * cols, 0, sizeof(float) * seen);
    }
    float *out = a->out + l0 * a->o_rs + h * Dv;
    if (vfast) {
        for (long r0 = 0; r0 < rpad; r0 += PA_MR)
            for (long c0 = 0; c0 < Dv; c0 += PA_VC)
                pa_value_tile(S + r0 * cols, cols, vh + c0, Dv, seen, ot + r0 * Dv + c0, Dv);
        for (long r = 0; r < rows; r++) memcpy(out + r * a->o_rs, ot + r * Dv, sizeof(float) * Dv);
        return;
    }
    for (long r = 0; r < rows; r++) {  /* channels that fill no whole tile: plain loops */
        float *o = out + r * a->o_rs;
        const float *p = S + r * cols;
        for (long c = 0; c < Dv; c++) o[c] = 0.f;
        for (long j = 0; j < seen; j++) {
            float pj = p[j];
            #pragma omp simd
            for (long c = 0; c < Dv; c++) o[c] += pj * vh[j * Dv + c];
        }
    }
}

/* out[l][h * Dv + c] = softmax(q_h[l] K_{h/G}^T) V_{h/G} for H query heads over Hkv KV heads (G = H / Hkv).
   q: H x L x Dk (scaled), heads q_hs floats apart; k: Hkv x T x Dk, heads k_hs apart; v: Hkv x T x Dv, heads
   v_hs apart (rows contiguous); the L queries are positions offset .. offset + L - 1 (causal: row l sees keys
   0 .. offset + l). out rows are H * Dv floats. Returns 0, or -1 when memory for the packed keys or a chunk's
   scores could not be had (then `out` is partly written: the caller computes it another way). */
int KFN(prefill_attention)(const float *q, const float *k, const float *v, float *out, long H, long Hkv, long L,
                           long T, long Dk, long Dv, long q_hs, long k_hs, long v_hs, long offset, int causal) {
    if (L < 1 || T < 1 || H % Hkv) return -1;
    long blocks = (T + PA_NR - 1) / PA_NR;
    long kp_hs = blocks * Dk * PA_NR;
    float *kp = aligned_alloc(64, sizeof(float) * Hkv * kp_hs);
    if (!kp) return -1;
    for (long kh = 0; kh < Hkv; kh++) pa_pack_keys(k + kh * k_hs, T, Dk, kp + kh * kp_hs);
    long tpad = blocks * PA_NR;
    long R = PA_SCORES_FLOATS / tpad / PA_MR * PA_MR;
    if (R < PA_MR) R = PA_MR;
    if (R > 8 * PA_MR) R = 8 * PA_MR;
    pa_t a = {.q = q, .kp = kp, .v = v, .out = out, .H = H, .G = H / Hkv, .L = L, .T = T, .Dk = Dk, .Dv = Dv,
              .offset = offset, .causal = causal, .R = R, .tiles = (L + R - 1) / R, .q_hs = q_hs, .v_hs = v_hs,
              .kp_hs = kp_hs, .o_rs = H * Dv};
    parley_parallel_for_heavy(pa_chunk, &a, H * a.tiles);
    free(kp);
    return a.failed ? -1 : 0;
}
