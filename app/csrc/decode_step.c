/* The whole one-token decode step of a llama-style model in one call: every layer, then the final norm and
   the vocabulary head. Per token the Python glue (app/model/decode_step.py) crosses into C once instead of
   ~10 times a layer, and the residual stream never leaves one scratch buffer.

   Per layer: RMSNorm, the stacked q/k/v 4/8-bit gemv, rope (cos/sin given: the model's own rope module
   computed them, so scaling variants need nothing here), the new key/value row written in place into the
   cache's fp32 tail, attention over the encoded sealed blocks plus the tail (kvq_attn_decode, the kernel
   app/kvstore/block_attention.py calls), o_proj, residual, RMSNorm, gate/up gemv, SiLU*up, down, residual.
   The gemv, attention and SiLU are the existing kernels, called as they are, so the values are those of
   the per-module path (app/model/cpu_blocks.py): RMSNorm and rope below use MLX's exact arithmetic
   (sequential fp32 sum of squares; x*c - y*s with separately rounded products), compiled without
   fast-math or contraction.

   Model descriptor (longs, DSM_*), layer descriptor (DSL_* longs per layer), eps[2 * layers + 1]
   (input and post-attention norm of each layer, then the final norm). A gemv is 4 longs: packed weights,
   fp32 scales, fp32 biases (MLX's affine layout, group 32), bits (4 or 8).
   Returns 0, or -1 when the scratch memory could not be allocated (nothing written then). */
#include "kernels.h"
#include <stdlib.h>
#include <string.h>

enum {
    DSM_LAYERS, DSM_DIM, DSM_HEADS, DSM_KV_HEADS, DSM_HEAD_DIM, DSM_INTER, DSM_VOCAB, DSM_TRADITIONAL,
    DSM_EMBED, DSM_NORM, DSM_HEAD, DSM_LUT = DSM_HEAD + 4, DSM_LONGS
};
enum {
    DSL_NORM1, DSL_NORM2, DSL_QKV, DSL_O = DSL_QKV + 4, DSL_GATE_UP = DSL_O + 4, DSL_DOWN = DSL_GATE_UP + 4,
    DSL_KSPEC = DSL_DOWN + 4, DSL_VSPEC, DSL_N_BLOCKS, DSL_BLOCKS, DSL_TAIL_K, DSL_TAIL_V, DSL_TAIL_K_HS,
    DSL_TAIL_V_HS, DSL_LONGS
};

static void ds_gemv(const long *g, const float *x, float *y, long O, long K) {
    const unsigned char *w = (const unsigned char *)g[0];
    if (g[3] == 4)
        KFN(q4_gemv)(w, (const float *)g[1], (const float *)g[2], x, y, O, K);
    else
        KFN(q8_gemv)(w, (const float *)g[1], (const float *)g[2], x, y, O, K);
}

#pragma GCC push_options
#pragma GCC optimize("no-fast-math", "fp-contract=off")
/* out = w * (x * r), r = 1 / sqrt(sum(x*x) / n + eps) summed in order: MLX's CPU rms_norm (host_exec.rms_host). */
static void ds_rms(const float *x, const float *w, float eps, float *out, long n) {
    float ss = 0.f;
    for (long i = 0; i < n; i++) {
        float sq = x[i] * x[i];
        ss += sq;
    }
    float r = 1.f / sqrtf(ss * (float)(1.0 / (double)n) + eps);
    for (long i = 0; i < n; i++) {
        float xr = x[i] * r;
        out[i] = w[i] * xr;
    }
}

/* Rope of `heads` vectors of D floats in place. cs: the rope of a probe vector at this position (ones at
   the first element of each rotated pair, zeros at the second), i.e. cos at the pair's first slot, sin at
   its second; pairs are (i, i + D/2), or (2i, 2i + 1) when traditional. */
static void ds_rope(float *x, long heads, long D, const float *cs, long traditional) {
    long half = D / 2;
    for (long h = 0; h < heads; h++) {
        float *v = x + h * D;
        for (long i = 0; i < half; i++) {
            long i1 = traditional ? 2 * i : i, i2 = traditional ? 2 * i + 1 : i + half;
            float c = cs[i1], s = cs[i2], a = v[i1], b = v[i2];
            float ac = a * c, bs = b * s, as = a * s, bc = b * c;
            v[i1] = ac - bs;
            v[i2] = as + bc;
        }
    }
}
#pragma GCC pop_options

int KFN(decode_step)(const long *model, const long *layers, const float *eps, float scale, long token,
                     const float *cs, long n_tail, float *logits) {
    long n_layers = model[DSM_LAYERS], dim = model[DSM_DIM], H = model[DSM_HEADS], Hkv = model[DSM_KV_HEADS];
    long D = model[DSM_HEAD_DIM], inter = model[DSM_INTER], vocab = model[DSM_VOCAB];
    long nq = H * D, nkv = Hkv * D, G = H / Hkv, total = 0;
    const float *lut = (const float *)model[DSM_LUT];
    for (long l = 0; l < n_layers; l++) { /* the longest attention span of any layer (they agree in practice) */
        const long *L = layers + l * DSL_LONGS, *blocks = (const long *)L[DSL_BLOCKS];
        long t = n_tail + 1;
        for (long b = 0; b < L[DSL_N_BLOCKS]; b++) t += blocks[8 * b + 6];
        total = t > total ? t : total;
    }
    long n_scratch = 3 * dim + (nq + 2 * nkv) + nq + 2 * inter + G * total;
    float *mem = malloc(sizeof(float) * n_scratch);
    if (mem == NULL) return -1;
    float *x = mem, *xn = x + dim, *r = xn + dim, *qkv = r + dim, *att = qkv + nq + 2 * nkv, *gu = att + nq;
    float *scores = gu + 2 * inter;
    memcpy(x, (const float *)model[DSM_EMBED] + token * dim, sizeof(float) * dim);
    for (long l = 0; l < n_layers; l++) {
        const long *L = layers + l * DSL_LONGS;
        ds_rms(x, (const float *)L[DSL_NORM1], eps[2 * l], xn, dim);
        ds_gemv(L + DSL_QKV, xn, qkv, nq + 2 * nkv, dim);
        float *q = qkv, *k = qkv + nq, *v = k + nkv;
        ds_rope(q, H, D, cs, model[DSM_TRADITIONAL]);
        ds_rope(k, Hkv, D, cs, model[DSM_TRADITIONAL]);
        float *tk = (float *)L[DSL_TAIL_K], *tv = (float *)L[DSL_TAIL_V];
        long tk_hs = L[DSL_TAIL_K_HS], tv_hs = L[DSL_TAIL_V_HS];
        for (long h = 0; h < Hkv; h++) {
            memcpy(tk + h * tk_hs + n_tail * D, k + h * D, sizeof(float) * D);
            memcpy(tv + h * tv_hs + n_tail * D, v + h * D, sizeof(float) * D);
        }
        KFN(kvq_attn_decode)(lut, q, att, scores, H, Hkv, D, D, scale, (const long *)L[DSL_KSPEC],
                             (const long *)L[DSL_VSPEC], L[DSL_N_BLOCKS], (const long *)L[DSL_BLOCKS], tk, tv,
                             n_tail + 1, tk_hs, tv_hs, 1);
        ds_gemv(L + DSL_O, att, r, dim, nq);
        for (long i = 0; i < dim; i++) x[i] = x[i] + r[i];
        ds_rms(x, (const float *)L[DSL_NORM2], eps[2 * l + 1], xn, dim);
        ds_gemv(L + DSL_GATE_UP, xn, gu, 2 * inter, dim);
        KFN(silu_mul)(gu, gu + inter, inter);
        ds_gemv(L + DSL_DOWN, gu, r, dim, inter);
        for (long i = 0; i < dim; i++) x[i] = x[i] + r[i];
    }
    ds_rms(x, (const float *)model[DSM_NORM], eps[2 * n_layers], xn, dim);
    ds_gemv(model + DSM_HEAD, xn, logits, vocab, dim);
    free(mem);
    return 0;
}
