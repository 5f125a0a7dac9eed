/* Attention pieces of the CPU path: the softmax of prefill (after BLAS computed the scores) and the whole
   one-token decode attention over a KV cache (no tiny BLAS calls: their thread wake-ups cost more than
   the math). */
#include "kernels.h"
#include <float.h>
#include <math.h>
#include <stddef.h>

/* The softmax of one row of scores in place: the first n entries normalised, the rest (to T) zero. One
   definition for every caller (causal_softmax, the fused prefill attention), so they agree bit for bit. */
static inline void softmax_row(float *row, long n, long T) {
    float m = -FLT_MAX;
    for (long j = 0; j < n; j++) m = row[j] > m ? row[j] : m;
    float sum = 0.f;
    #pragma omp simd reduction(+:sum)
    for (long j = 0; j < n; j++) { float e = expf(row[j] - m); row[j] = e; sum += e; }
    float inv = 1.f / sum;
    #pragma omp simd
    for (long j = 0; j < n; j++) row[j] *= inv;
    for (long j = n; j < T; j++) row[j] = 0.f;
}

/* Row-wise softmax in place over s[rows][T] (scores already scaled). Row r is
   query (r % L), at absolute position offset + r % L; with causal set, keys
   after it get probability 0. */
void KFN(causal_softmax)(float *s, long rows, long L, long T, long offset, int causal) {
    #pragma omp parallel for schedule(static)
    for (long r = 0; r < rows; r++) {
        float *row = s + r * T;
        long n = causal ? offset + (r % L) + 1 : T;
        if (n > T) n = T;
        softmax_row(row, n, T);
    }
}

/* One query row per head against a KV cache (decode step): out[h][D] = softmax(scale q_h K^T) V
   for the kv head h / (H / Hkv). Rows of K/V are contiguous (D floats); heads are k_hs/v_hs
   floats apart (the cache buffer may be longer than T). */
void KFN(attn_decode)(const float *q, const float *k, const float *v, float *out, float *s,
                 long H, long Hkv, long T, long D, long k_hs, long v_hs, float scale) {
    long G = H / Hkv;
    for (long h = 0; h < H; h++) {
        const float *qh = q + h * D, *kh = k + (h / G) * k_hs, *vh = v + (h / G) * v_hs;
        float m = -FLT_MAX;
        for (long t = 0; t < T; t++) {
            float d = 0.f;
            #pragma omp simd reduction(+:d)
            for (long i = 0; i < D; i++) d += qh[i] * kh[t * D + i];
            d *= scale;
            s[t] = d;
            m = d > m ? d : m;
        }
        float sum = 0.f;
        #pragma omp simd reduction(+:sum)
        for (long t = 0; t < T; t++) { float e = expf(s[t] - m); s[t] = e; sum += e; }
        float *oh = out + h * D;
        for (long i = 0; i < D; i++) oh[i] = 0.f;
        for (long t = 0; t < T; t++) {
            float p = s[t] / sum;
            #pragma omp simd
            for (long i = 0; i < D; i++) oh[i] += p * vh[t * D + i];
        }
    }
}
