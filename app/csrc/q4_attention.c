/* Decode-step attention over a KV cache kept as sealed blocks in their encoded (4/8-bit or float16)
   form plus a full-precision (fp32) tail: no fp32 copy of the sealed blocks exists anywhere.

   For each KV head the kernel walks the blocks once for the scores (each key row dequantized once, in
   registers / an L1 row buffer, and dotted with the G query heads that share it: GQA without repeating
   K/V), runs the softmax over all positions, then walks the blocks again for the weighted sum of the
   dequantized value rows. A dequantized element is code * scale + bias in fp32 (the product of a code
   < 256 and a float16 scale is exact, so the one rounding is the add, fused or not): the very numbers
   `schemes.decode` gives. The result therefore equals attention over the decoded fp32 copy up to the
   order of the fp32 sums.

   Tensor spec (3 longs): kind, bits, G.
     kind 0: affine per token, groups of G channels: q (H,T,D*bits/8), s/b (H,T,D/G) float16 bits.
     kind 1: affine per channel, groups of G tokens:  q (H,T,D*bits/8), s/b (H,ceil(T/G),D) float16 bits.
     kind 2: float16 (H,T,D).
   4-bit codes: two a byte, the even channel in the low nibble.
   Block row (8 longs): k_q, k_s, k_b, v_q, v_s, v_b, T, 0 (addresses; for kind 2 only *_q is used).
   isa: 1 = the AVX2+FMA path (where compiled in and the shapes allow it), 0 = the portable C loops. */

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include "kv_codes.h"

int KFN(kvq_has_avx2)(void) {
#if defined(__AVX2__) && defined(__FMA__)
    return 1;
#else
    return 0;
#endif
}

typedef struct {
    long kind, bits, G;
} spec_t;

/* One tensor of one block for one head, with the float scale/bias of the current token group
   (channel layout) cached in sf/bf. */
typedef struct {
    const spec_t *sp;
    const uint8_t *q;
    const uint16_t *s, *b;
    long T, D, h, group;
    float *sf, *bf;
} rows_t;

static void rows_init(rows_t *r, const spec_t *sp, const long *blk, int which, long h, long D, float *sf, float *bf) {
    r->sp = sp;
    r->q = (const uint8_t *)blk[3 * which];
    r->s = (const uint16_t *)blk[3 * which + 1];
    r->b = (const uint16_t *)blk[3 * which + 2];
    r->T = blk[6];
    r->D = D;
    r->h = h;
    r->group = -1;
    r->sf = sf;
    r->bf = bf;
}

#if defined(__AVX2__) && defined(__FMA__)
static inline float kvq_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
#endif

/* Row t of r dequantized into row[D]. */
static void deq_row(const float *lut, rows_t *r, long t, float *row, int avx) {
    const spec_t *sp = r->sp;
    long D = r->D, T = r->T, h = r->h;
    if (sp->kind == 2) {
        const uint16_t *x = (const uint16_t *)r->q + (h * T + t) * D;
        for (long i = 0; i < D; i++) row[i] = lut[x[i]];
        return;
    }
    long bits = sp->bits, dp = D * bits / 8;
    const uint8_t *qr = r->q + (h * T + t) * dp;
    const float *sf, *bf;
    float tsf[D], tbf[D];
    if (sp->kind == 1) {
        long g = t / sp->G, n = (T + sp->G - 1) / sp->G;
        if (g != r->group) {
            const uint16_t *sr = r->s + (h * n + g) * D, *br = r->b + (h * n + g) * D;
            for (long i = 0; i < D; i++) { r->sf[i] = lut[sr[i]]; r->bf[i] = lut[br[i]]; }
            r->group = g;
        }
        sf = r->sf;
        bf = r->bf;
    } else {
        long ng = D / sp->G;
        const uint16_t *sr = r->s + (h * T + t) * ng, *br = r->b + (h * T + t) * ng;
#if defined(__AVX2__) && defined(__FMA__)
        if (avx && sp->G % 8 == 0 && D % 8 == 0) {
            for (long g = 0; g < ng; g++) {
                __m256 vs = _mm256_set1_ps(lut[sr[g]]), vb = _mm256_set1_ps(lut[br[g]]);
                for (long j = g * sp->G; j < (g + 1) * sp->G; j += 8) {
                    __m256 c = bits == 4 ? codes4x8(qr + j / 2) : codes8x8(qr + j);
                    _mm256_storeu_ps(row + j, _mm256_fmadd_ps(c, vs, vb));
                }
            }
            return;
        }
#endif
        for (long g = 0; g < ng; g++)
            for (long j = g * sp->G; j < (g + 1) * sp->G; j++) { tsf[j] = lut[sr[g]]; tbf[j] = lut[br[g]]; }
        sf = tsf;
        bf = tbf;
    }
#if defined(__AVX2__) && defined(__FMA__)
    if (avx && D % 8 == 0) {
        for (long j = 0; j < D; j += 8) {
            __m256 c = bits == 4 ? codes4x8(qr + j / 2) : codes8x8(qr + j);
            _mm256_storeu_ps(row + j, _mm256_fmadd_ps(c, _mm256_loadu_ps(sf + j), _mm256_loadu_ps(bf + j)));
        }
        return;
    }
#endif
    if (bits == 4) {
        for (long j = 0; j < D / 2; j++) {
            uint8_t c = qr[j];
            row[2 * j] = (float)(c & 15) * sf[2 * j] + bf[2 * j];
            row[2 * j + 1] = (float)(c >> 4) * sf[2 * j + 1] + bf[2 * j + 1];
        }
    } else {
        for (long j = 0; j < D; j++) row[j] = (float)qr[j] * sf[j] + bf[j];
    }
}

static inline float dot(const float *a, const float *b, long D, int avx) {
#if defined(__AVX2__) && defined(__FMA__)
    if (avx && D % 8 == 0) {
        __m256 acc = _mm256_setzero_ps();
        for (long j = 0; j < D; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
        return kvq_hsum8(acc);
    }
#endif
    float s = 0.f;
    for (long j = 0; j < D; j++) s += a[j] * b[j];
    return s;
}

static inline void axpy(float *y, float p, const float *x, long D, int avx) {
#if defined(__AVX2__) && defined(__FMA__)
    if (avx && D % 8 == 0) {
        __m256 vp = _mm256_set1_ps(p);
        for (long j = 0; j < D; j += 8) _mm256_storeu_ps(y + j, _mm256_fmadd_ps(vp, _mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j)));
        return;
    }
#endif
    for (long j = 0; j < D; j++) y[j] += p * x[j];
}

/* out[H][Dv] = softmax(scale q_h K^T) V over the sealed blocks then the tail, for one query position.
   q: H x Dk floats (query heads kh*G .. kh*G+G-1 share KV head kh). scratch: G * (total tokens) floats.
   tail rows: tk + kh * tk_hs + t * Dk (contiguous rows, heads tk_hs floats apart); same for tv. */
void KFN(kvq_attn_decode)(const float *lut, const float *q, float *out, float *scratch,
                     long H, long Hkv, long Dk, long Dv, float scale,
                     const long *kspec, const long *vspec, long n_blocks, const long *blocks,
                     const float *tk, const float *tv, long n_tail, long tk_hs, long tv_hs, long isa) {
    spec_t ks = {kspec[0], kspec[1], kspec[2]}, vs = {vspec[0], vspec[1], vspec[2]};
    int avx = isa == 1 && KFN(kvq_has_avx2)();
    long G = H / Hkv, total = n_tail;
    for (long b = 0; b < n_blocks; b++) total += blocks[8 * b + 6];
    float krow[Dk], vrow[Dv], sfk[Dk], bfk[Dk], sfv[Dv], bfv[Dv], inv[G];
    for (long kh = 0; kh < Hkv; kh++) {
        const float *qh = q + kh * G * Dk;
        long pos = 0;
        for (long b = 0; b < n_blocks; b++) {
            rows_t r;
            rows_init(&r, &ks, blocks + 8 * b, 0, kh, Dk, sfk, bfk);
            for (long t = 0; t < r.T; t++, pos++) {
                deq_row(lut, &r, t, krow, avx);
                for (long g = 0; g < G; g++) scratch[g * total + pos] = dot(qh + g * Dk, krow, Dk, avx) * scale;
            }
        }
        for (long t = 0; t < n_tail; t++, pos++) {
            const float *kr = tk + kh * tk_hs + t * Dk;
            for (long g = 0; g < G; g++) scratch[g * total + pos] = dot(qh + g * Dk, kr, Dk, avx) * scale;
        }
        for (long g = 0; g < G; g++) {
            float *s = scratch + g * total, m = -FLT_MAX, sum = 0.f;
            for (long t = 0; t < total; t++) m = s[t] > m ? s[t] : m;
            for (long t = 0; t < total; t++) { float e = expf(s[t] - m); s[t] = e; sum += e; }
            inv[g] = 1.f / sum;
            memset(out + (kh * G + g) * Dv, 0, sizeof(float) * Dv);
        }
        pos = 0;
        for (long b = 0; b < n_blocks; b++) {
            rows_t r;
            rows_init(&r, &vs, blocks + 8 * b, 1, kh, Dv, sfv, bfv);
            for (long t = 0; t < r.T; t++, pos++) {
                deq_row(lut, &r, t, vrow, avx);
                for (long g = 0; g < G; g++) axpy(out + (kh * G + g) * Dv, scratch[g * total + pos] * inv[g], vrow, Dv, avx);
            }
        }
        for (long t = 0; t < n_tail; t++, pos++) {
            const float *vr = tv + kh * tv_hs + t * Dv;
            for (long g = 0; g < G; g++) axpy(out + (kh * G + g) * Dv, scratch[g * total + pos] * inv[g], vr, Dv, avx);
        }
    }
}
