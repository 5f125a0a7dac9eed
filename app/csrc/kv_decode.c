/* Decode sealed KV-cache blocks (4/8-bit affine per token or per channel, float16, float32) straight into
   the fp32 working copies; bit-identical to `schemes.decode` (see app/kvstore/fast_decode.py). */
#include "kernels.h"
#include "threads.h"
#include <stdint.h>
#include <string.h>

/* One job = 12 longs: kind, bits, H, T, D, G, q, s, b, out, out_head_stride, 0.
   kind 0: affine, groups of G channels per token: q (H,T,D*bits/8), s/b (H,T,D/G) float16 bits.
   kind 1: affine, groups of G tokens per channel: q (H,T,D*bits/8), s/b (H,ceil(T/G),D) float16 bits.
   kind 2: float16 (H,T,D) -> float32.  kind 3: float32 (H,T,D) copied.
   out: first token of this block in a (H, *, D) fp32 buffer whose heads are out_head_stride floats apart.
   4-bit codes: two a byte, the even channel in the low nibble. x = code * scale + bias in fp32. */


#ifdef __AVX2__
#include <immintrin.h>
#include "kv_codes.h"
/* code * scale + bias with a separate multiply and add, as MLX computes it (the product is exact anyway). */
static inline __m256 affine8(__m256 c, __m256 s, __m256 b) { return _mm256_add_ps(_mm256_mul_ps(c, s), b); }
#endif

static void dec_token(const float *lut, long bits, long H, long T, long D, long G,
                      const uint8_t *q, const uint16_t *s, const uint16_t *b, float *out, long os) {
    long ng = D / G, dp = D * bits / 8;
    for (long h = 0; h < H; h++) {
        for (long t = 0; t < T; t++) {
            const uint8_t *qr = q + (h * T + t) * dp;
            const uint16_t *sr = s + (h * T + t) * ng, *br = b + (h * T + t) * ng;
            float *o = out + h * os + t * D;
            for (long g = 0; g < ng; g++) {
                float sc = lut[sr[g]], bi = lut[br[g]];
                float *og = o + g * G;
#ifdef __AVX2__
                if ((bits == 4 || bits == 8) && G % 8 == 0) {
                    __m256 vs = _mm256_set1_ps(sc), vb = _mm256_set1_ps(bi);
                    const uint8_t *qg = qr + g * G * bits / 8;
                    for (long j = 0; j < G; j += 8)
                        _mm256_storeu_ps(og + j, affine8(bits == 4 ? codes4x8(qg + j / 2) : codes8x8(qg + j), vs, vb));
                    continue;
                }
#endif
                if (bits == 4) {
                    const uint8_t *qg = qr + g * G / 2;
                    for (long j = 0; j < G / 2; j++) {
                        uint8_t c = qg[j];
                        og[2 * j] = (float)(c & 15) * sc + bi;
                        og[2 * j + 1] = (float)(c >> 4) * sc + bi;
                    }
                } else {
                    const uint8_t *qg = qr + g * G;
                    for (long j = 0; j < G; j++) og[j] = (float)qg[j] * sc + bi;
                }
            }
        }
    }
}

static void dec_channel(const float *lut, long bits, long H, long T, long D, long G,
                        const uint8_t *q, const uint16_t *s, const uint16_t *b, float *out, long os) {
    long n = (T + G - 1) / G, dp = D * bits / 8;
    float sf[D], bf[D];
    for (long h = 0; h < H; h++) {
        for (long g = 0; g < n; g++) {
            const uint16_t *sr = s + (h * n + g) * D, *br = b + (h * n + g) * D;
            for (long i = 0; i < D; i++) { sf[i] = lut[sr[i]]; bf[i] = lut[br[i]]; }
            long t1 = (g + 1) * G < T ? (g + 1) * G : T;
            for (long t = g * G; t < t1; t++) {
                const uint8_t *qr = q + (h * T + t) * dp;
                float *o = out + h * os + t * D;
#ifdef __AVX2__
                if ((bits == 4 || bits == 8) && D % 8 == 0) {
                    for (long j = 0; j < D; j += 8)
                        _mm256_storeu_ps(o + j, affine8(bits == 4 ? codes4x8(qr + j / 2) : codes8x8(qr + j),
                                                        _mm256_loadu_ps(sf + j), _mm256_loadu_ps(bf + j)));
                    continue;
                }
#endif
                if (bits == 4) {
                    for (long j = 0; j < D / 2; j++) {
                        uint8_t c = qr[j];
                        o[2 * j] = (float)(c & 15) * sf[2 * j] + bf[2 * j];
                        o[2 * j + 1] = (float)(c >> 4) * sf[2 * j + 1] + bf[2 * j + 1];
                    }
                } else {
                    for (long j = 0; j < D; j++) o[j] = (float)qr[j] * sf[j] + bf[j];
                }
            }
        }
    }
}

static void decode_range(const float *lut, long n, const long *jobs) {
    for (long k = 0; k < n; k++) {
        const long *j = jobs + 12 * k;
        long kind = j[0], bits = j[1], H = j[2], T = j[3], D = j[4], G = j[5], os = j[10];
        const uint8_t *q = (const uint8_t *)j[6];
        const uint16_t *s = (const uint16_t *)j[7], *b = (const uint16_t *)j[8];
        float *out = (float *)j[9];
        if (kind == 0) dec_token(lut, bits, H, T, D, G, q, s, b, out, os);
        else if (kind == 1) dec_channel(lut, bits, H, T, D, G, q, s, b, out, os);
        else if (kind == 2) {
            const uint16_t *x = (const uint16_t *)q;
            for (long h = 0; h < H; h++)
                for (long i = 0; i < T * D; i++) out[h * os + i] = lut[x[h * T * D + i]];
        } else {
            const float *x = (const float *)q;
            for (long h = 0; h < H; h++) memcpy(out + h * os, x + h * T * D, sizeof(float) * T * D);
        }
    }
}

/* The jobs shared with the pool's helper threads (threads.c), one job a chunk: decoding is bound by
   memory writes, and one core alone does not saturate them (30 -> 20 ms for an 8K-token cache).
   `threads` < 2 keeps them on the calling thread. */
struct decode_jobs { const float *lut; const long *jobs; };
static void decode_one(void *arg, long k) {
    const struct decode_jobs *d = arg;
    decode_range(d->lut, 1, d->jobs + 12 * k);
}

void KFN(kv_decode_jobs)(const float *lut, long n, const long *jobs, long threads) {
    if (threads < 2 || n < 2) {
        decode_range(lut, n, jobs);
        return;
    }
    struct decode_jobs d = { lut, jobs };
    parley_parallel_for(decode_one, &d, n);
}
