/* The 4-bit and 8-bit row arithmetic shared by the one-row gemv (decode) and the row-batched kernel
   (scenes): y[B][O] = W x[B][K], W in MLX's affine layout (group 32; 4-bit: two weights a byte, low nibble
   first), w = q * scale + bias per group. One body, so a row computes bitwise the same value alone or in a
   batch. The bodies are always inlined with a constant B (1..8), which keeps the accumulators in registers.

   Per row and output: bias = sum_g bias[g] * (sum of the group's x), then per group
   d = x_even . lo + x_odd . hi (4-bit) or x . q (8-bit), acc += scale[g] * d, y = sum(acc) + bias.
   Three bodies by instruction set (AVX-512: 16 lanes; AVX2+FMA: two halves of 8; portable: scalar); the
   variant wrappers (variant_*.c) pick one through the target they compile for. */
#ifndef PARLEY_QUANT_ROWS_H
#define PARLEY_QUANT_ROWS_H

#include <stddef.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#define QROWS_MAX 8
#define QROWS_INLINE static inline __attribute__((always_inline))

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
/* Sum of the 8 lanes. */
QROWS_INLINE float qrows_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 h = _mm_movehdup_ps(s);
    s = _mm_add_ps(s, h);
    h = _mm_movehl_ps(h, s);
    return _mm_cvtss_f32(_mm_add_ss(s, h));
}
#endif

/* Row x[K] split into even (xe) and odd (xo) channels, 16 of each per group, and the group sums xs[K/32]. */
QROWS_INLINE void q4_split_row(const float *x, long K, float *xe, float *xo, float *xs) {
    long G = K / 32;
    for (long g = 0; g < G; g++) {
        float t = 0.f;
        for (int j = 0; j < 16; j++) {
            xe[g * 16 + j] = x[g * 32 + 2 * j];
            xo[g * 16 + j] = x[g * 32 + 2 * j + 1];
            t += x[g * 32 + 2 * j] + x[g * 32 + 2 * j + 1];
        }
        xs[g] = t;
    }
}

/* Group sums xs[K/32] of a row x[K] (8-bit). */
QROWS_INLINE void q8_group_sums(const float *x, long K, float *xs) {
    long G = K / 32;
    for (long g = 0; g < G; g++) {
        float t = 0.f;
        for (int j = 0; j < 32; j++) t += x[g * 32 + j];
        xs[g] = t;
    }
}

/* sum_g bo[g] * xs[g], in order. */
QROWS_INLINE float qrows_bias(const float *bo, const float *xs, long G) {
    float t = 0.f;
    for (long g = 0; g < G; g++) t += bo[g] * xs[g];
    return t;
}

/* 4-bit body for B rows, outputs o0..o1-1 of O: xe/xo rows are K/2 floats apart, xs rows G apart; y rows O apart. */
QROWS_INLINE void q4_rows_body(const unsigned char *w, const float *s, const float *b, const float *xe,
                               const float *xo, const float *xs, float *y, long O, long K, long o0, long o1,
                               const long B) {
    long G = K / 32, H = K / 2;
    for (long o = o0; o < o1; o++) {
        const unsigned char *p = w + o * H;
        const float *so = s + o * G, *bo = b + o * G;
        float bias[QROWS_MAX];
        for (long r = 0; r < B; r++) bias[r] = qrows_bias(bo, xs + r * G, G);
#ifdef __AVX512F__
        __m512 acc[QROWS_MAX];
        for (long r = 0; r < B; r++) acc[r] = _mm512_setzero_ps();
        const __m512i m15 = _mm512_set1_epi32(15);
        for (long g = 0; g < G; g++) {
            __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + g * 16)));
            __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, m15));
            __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
            __m512 sc = _mm512_set1_ps(so[g]);
            for (long r = 0; r < B; r++) {
                __m512 d = _mm512_mul_ps(_mm512_loadu_ps(xe + r * H + g * 16), lo);
                d = _mm512_fmadd_ps(_mm512_loadu_ps(xo + r * H + g * 16), hi, d);
                acc[r] = _mm512_fmadd_ps(sc, d, acc[r]);
            }
        }
        for (long r = 0; r < B; r++) y[r * O + o] = _mm512_reduce_add_ps(acc[r]) + bias[r];
#elif defined(__AVX2__) && defined(__FMA__)
        /* the 16 bytes of a group as two halves of 8 (channels 0-15 and 16-31 of the group) */
        __m256 acc[QROWS_MAX][2];
        for (long r = 0; r < B; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        const __m256i m15 = _mm256_set1_epi32(15);
        for (long g = 0; g < G; g++) {
            __m256i q0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + g * 16)));
            __m256i q1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + g * 16 + 8)));
            __m256 lo0 = _mm256_cvtepi32_ps(_mm256_and_si256(q0, m15)), hi0 = _mm256_cvtepi32_ps(_mm256_srli_epi32(q0, 4));
            __m256 lo1 = _mm256_cvtepi32_ps(_mm256_and_si256(q1, m15)), hi1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(q1, 4));
            __m256 sc = _mm256_set1_ps(so[g]);
            for (long r = 0; r < B; r++) {
                const float *xer = xe + r * H + g * 16, *xor_ = xo + r * H + g * 16;
                __m256 d0 = _mm256_mul_ps(_mm256_loadu_ps(xer), lo0);
                __m256 d1 = _mm256_mul_ps(_mm256_loadu_ps(xer + 8), lo1);
                d0 = _mm256_fmadd_ps(_mm256_loadu_ps(xor_), hi0, d0);
                d1 = _mm256_fmadd_ps(_mm256_loadu_ps(xor_ + 8), hi1, d1);
                acc[r][0] = _mm256_fmadd_ps(sc, d0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(sc, d1, acc[r][1]);
            }
        }
        for (long r = 0; r < B; r++) y[r * O + o] = qrows_hsum256(_mm256_add_ps(acc[r][0], acc[r][1])) + bias[r];
#else
        for (long r = 0; r < B; r++) {
            const float *xer = xe + r * H, *xor_ = xo + r * H;
            float acc = 0.f;
            for (long g = 0; g < G; g++) {
                float d = 0.f;
                const unsigned char *pg = p + g * 16;
                for (int j = 0; j < 16; j++) d += xer[g * 16 + j] * (float)(pg[j] & 15) + xor_[g * 16 + j] * (float)(pg[j] >> 4);
                acc += so[g] * d;
            }
            y[r * O + o] = acc + bias[r];
        }
#endif
    }
}

/* 8-bit body for B rows, outputs o0..o1-1 of O: x rows K apart, xs rows G apart; y rows O apart. */
QROWS_INLINE void q8_rows_body(const unsigned char *w, const float *s, const float *b, const float *x,
                               const float *xs, float *y, long O, long K, long o0, long o1, const long B) {
    long G = K / 32;
    for (long o = o0; o < o1; o++) {
        const unsigned char *p = w + o * K;
        const float *so = s + o * G, *bo = b + o * G;
        float bias[QROWS_MAX];
        for (long r = 0; r < B; r++) bias[r] = qrows_bias(bo, xs + r * G, G);
#ifdef __AVX512F__
        __m512 acc[QROWS_MAX];
        for (long r = 0; r < B; r++) acc[r] = _mm512_setzero_ps();
        for (long g = 0; g < G; g++) {
            __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + g * 32))));
            __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + g * 32 + 16))));
            __m512 sc = _mm512_set1_ps(so[g]);
            for (long r = 0; r < B; r++) {
                const float *xr = x + r * K;
                __m512 d = _mm512_mul_ps(_mm512_loadu_ps(xr + g * 32), a);
                d = _mm512_fmadd_ps(_mm512_loadu_ps(xr + g * 32 + 16), c, d);
                acc[r] = _mm512_fmadd_ps(sc, d, acc[r]);
            }
        }
        for (long r = 0; r < B; r++) y[r * O + o] = _mm512_reduce_add_ps(acc[r]) + bias[r];
#elif defined(__AVX2__) && defined(__FMA__)
        /* channels 0-7 and 16-23 into one half, 8-15 and 24-31 into the other (as the AVX-512 lanes pair them) */
        __m256 acc[QROWS_MAX][2];
        for (long r = 0; r < B; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (long g = 0; g < G; g++) {
            const unsigned char *pg = p + g * 32;
            __m256 a0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)pg)));
            __m256 a1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(pg + 8))));
            __m256 c0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(pg + 16))));
            __m256 c1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(pg + 24))));
            __m256 sc = _mm256_set1_ps(so[g]);
            for (long r = 0; r < B; r++) {
                const float *xr = x + r * K + g * 32;
                __m256 d0 = _mm256_mul_ps(_mm256_loadu_ps(xr), a0);
                __m256 d1 = _mm256_mul_ps(_mm256_loadu_ps(xr + 8), a1);
                d0 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 16), c0, d0);
                d1 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 24), c1, d1);
                acc[r][0] = _mm256_fmadd_ps(sc, d0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(sc, d1, acc[r][1]);
            }
        }
        for (long r = 0; r < B; r++) y[r * O + o] = qrows_hsum256(_mm256_add_ps(acc[r][0], acc[r][1])) + bias[r];
#else
        for (long r = 0; r < B; r++) {
            const float *xr = x + r * K;
            float acc = 0.f;
            for (long g = 0; g < G; g++) {
                float d = 0.f;
                for (int j = 0; j < 32; j++) d += xr[g * 32 + j] * (float)p[g * 32 + j];
                acc += so[g] * d;
            }
            y[r * O + o] = acc + bias[r];
        }
#endif
    }
}

#endif
