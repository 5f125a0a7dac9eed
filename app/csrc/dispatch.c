/* The library's exported kernels: each forwards to the active variant's (kernels.h).

   At load the best variant the CPU runs is chosen (AVX-512, then AVX2+FMA, then portable);
   parley_use_variant switches (PARLEY_KERNELS, tests). A variant the CPU cannot run is refused. */
#include "kernels.h"

#define N_VARIANTS 3
static const struct parley_kernels *const variants[N_VARIANTS] = {
    &parley_variant_portable, &parley_variant_avx2, &parley_variant_avx512};
static const struct parley_kernels *active = &parley_variant_portable;

/* Does this CPU (and its OS: AVX-512 state saved) run variant v? */
static int cpu_runs(int v) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (v == 1) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (v == 2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512vl");
#endif
    return v == 0;
}

int parley_variant_count(void) { return N_VARIANTS; }

const char *parley_variant_name(int v) { return v >= 0 && v < N_VARIANTS ? variants[v]->name : "?"; }

/* 1: compiled into this library; 0: not (another compiler or architecture). */
int parley_variant_built(int v) { return v >= 0 && v < N_VARIANTS && variants[v]->built; }

/* 1: built and this CPU runs it. */
int parley_variant_usable(int v) { return parley_variant_built(v) && cpu_runs(v); }

/* Switch to variant v: 0 done, -1 refused (not built, or the CPU cannot run it). */
int parley_use_variant(int v) {
    if (!parley_variant_usable(v)) return -1;
    active = variants[v];
    return 0;
}

int parley_active_variant(void) {
    for (int v = 0; v < N_VARIANTS; v++)
        if (variants[v] == active) return v;
    return -1;
}

__attribute__((constructor)) static void pick_best(void) {
    for (int v = N_VARIANTS - 1; v >= 0; v--)
        if (parley_use_variant(v) == 0) return;
}

void causal_softmax(float *s, long rows, long L, long T, long offset, int causal) {
    active->causal_softmax(s, rows, L, T, offset, causal);
}
void attn_decode(const float *q, const float *k, const float *v, float *out, float *s,
                 long H, long Hkv, long T, long D, long k_hs, long v_hs, float scale) {
    active->attn_decode(q, k, v, out, s, H, Hkv, T, D, k_hs, v_hs, scale);
}
void silu_mul(float *g, const float *u, long n) { active->silu_mul(g, u, n); }
int q4_fast(void) { return active->q4_fast(); }
int q4_rows_fast(void) { return active->q4_fast(); }
void q4_gemv(const unsigned char *w, const float *s, const float *b, const float *x, float *y, long O, long K) {
    active->q4_gemv(w, s, b, x, y, O, K);
}
void q8_gemv(const unsigned char *w, const float *s, const float *b, const float *x, float *y, long O, long K) {
    active->q8_gemv(w, s, b, x, y, O, K);
}
void q4_rows(const unsigned char *w, const float *s, const float *b, const float *x, float *y, long O, long K, long B) {
    active->q4_rows(w, s, b, x, y, O, K, B);
}
void q8_rows(const unsigned char *w, const float *s, const float *b, const float *x, float *y, long O, long K, long B) {
    active->q8_rows(w, s, b, x, y, O, K, B);
}
void kv_decode_jobs(const float *lut, long n, const long *jobs, long threads) {
    active->kv_decode_jobs(lut, n, jobs, threads);
}
int kvq_has_avx2(void) { return active->kvq_has_avx2(); }
void kvq_attn_decode(const float *lut, const float *q, float *out, float *scratch,
                     long H, long Hkv, long Dk, long Dv, float scale,
                     const long *kspec, const long *vspec, long n_blocks, const long *blocks,
                     const float *tk, const float *tv, long n_tail, long tk_hs, long tv_hs, long isa) {
    active->kvq_attn_decode(lut, q, out, scratch, H, Hkv, Dk, Dv, scale, kspec, vspec, n_blocks, blocks,
                            tk, tv, n_tail, tk_hs, tv_hs, isa);
}
int decode_step(const long *model, const long *layers, const float *eps, float scale, long token,
                const float *cs, long n_tail, float *logits) {
    return active->decode_step(model, layers, eps, scale, token, cs, n_tail, logits);
}
int crc32_fast(void) { return active->crc32_fast(); }
unsigned crc32_update(unsigned crc, const unsigned char *buf, long len) { return active->crc32_update(crc, buf, len); }
int kvq_attn_rows(const float *lut, const float *q, float *out, long H, long Hkv, long L, long Dk, long Dv,
                  float scale, const long *kspec, const long *vspec, long n_blocks, const long *blocks,
                  const float *tk, const float *tv, long n_tail, long tk_hs, long tv_hs, long isa) {
    return active->kvq_attn_rows(lut, q, out, H, Hkv, L, Dk, Dv, scale, kspec, vspec, n_blocks, blocks, tk, tv, n_tail,
                                 tk_hs, tv_hs, isa);
}
int prefill_attention(const float *q, const float *k, const float *v, float *out, long H, long Hkv, long L, long T,
                      long Dk, long Dv, long q_hs, long k_hs, long v_hs, long offset, int causal) {
    return active->prefill_attention(q, k, v, out, H, Hkv, L, T, Dk, Dv, q_hs, k_hs, v_hs, offset, causal);
}
int dequantize_rows(const unsigned char *w, const float *s, const float *b, float *out, long O, long K, long group,
                    long bits) {
    return active->dequantize_rows(w, s, b, out, O, K, group, bits);
}
