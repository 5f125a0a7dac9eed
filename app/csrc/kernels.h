/* The kernel table: every kernel of the CPU path, once per instruction-set variant.

   Each variant_*.c sets the compile target (#pragma GCC target), defines KFN to suffix the kernel names
   (causal_softmax -> causal_softmax_avx2) and includes kernels.inc, i.e. every kernel source once more;
   dispatch.c exports the plain names and forwards each call to the variant chosen at load time (the best
   the CPU runs) or by `parley_use_variant` (PARLEY_KERNELS). One build therefore runs everywhere, and the
   tests can run each variant the machine supports. */
#ifndef PARLEY_KERNELS_H
#define PARLEY_KERNELS_H

#ifndef KFN
#define KFN(name) name
#endif

struct parley_kernels {
    const char *name;
    int built; /* 0: this compiler or architecture could not build the variant */
    void (*causal_softmax)(float *s, long rows, long L, long T, long offset, int causal);
    void (*attn_decode)(const float *q, const float *k, const float *v, float *out, float *s,
                        long H, long Hkv, long T, long D, long k_hs, long v_hs, float scale);
    void (*silu_mul)(float *g, const float *u, long n);
    int (*q4_fast)(void);
    void (*q4_gemv)(const unsigned char *w, const float *s, const float *b, const float *x, float *y, long O, long K);
    void (*q8_gemv)(const unsigned char *w, const float *s, const float *b, const float *x, float *y, long O, long K);
    void (*q4_rows)(const unsigned char *w, const float *s, const float *b, const float *x, float *y,
                    long O, long K, long B);
    void (*q8_rows)(const unsigned char *w, const float *s, const float *b, const float *x, float *y,
                    long O, long K, long B);
    void (*kv_decode_jobs)(const float *lut, long n, const long *jobs, long threads);
    int (*kvq_has_avx2)(void);
    void (*kvq_attn_decode)(const float *lut, const float *q, float *out, float *scratch,
                            long H, long Hkv, long Dk, long Dv, float scale,
                            const long *kspec, const long *vspec, long n_blocks, const long *blocks,
                            const float *tk, const float *tv, long n_tail, long tk_hs, long tv_hs, long isa);
    int (*decode_step)(const long *model, const long *layers, const float *eps, float scale, long token,
                       const float *cs, long n_tail, float *logits);
    int (*kvq_attn_rows)(const float *lut, const float *q, float *out, long H, long Hkv, long L, long Dk, long Dv,
                         float scale, const long *kspec, const long *vspec, long n_blocks, const long *blocks,
                         const float *tk, const float *tv, long n_tail, long tk_hs, long tv_hs, long isa);
    int (*crc32_fast)(void);
    unsigned (*crc32_update)(unsigned crc, const unsigned char *buf, long len);
    int (*prefill_attention)(const float *q, const float *k, const float *v, float *out, long H, long Hkv, long L,
                             long T, long Dk, long Dv, long q_hs, long k_hs, long v_hs, long offset, int causal);
    int (*dequantize_rows)(const unsigned char *w, const float *s, const float *b, float *out, long O, long K,
                           long group, long bits);
};

/* The table of the variant being compiled (in a variant_*.c, after kernels.inc). */
#define PARLEY_TABLE(label) { label, 1, KFN(causal_softmax), KFN(attn_decode), KFN(silu_mul), KFN(q4_fast), \
    KFN(q4_gemv), KFN(q8_gemv), KFN(q4_rows), KFN(q8_rows), KFN(kv_decode_jobs), \
    KFN(kvq_has_avx2), KFN(kvq_attn_decode), KFN(decode_step), KFN(kvq_attn_rows), KFN(crc32_fast), \
    KFN(crc32_update), KFN(prefill_attention), KFN(dequantize_rows) }

extern const struct parley_kernels parley_variant_avx512, parley_variant_avx2, parley_variant_portable;

#endif
