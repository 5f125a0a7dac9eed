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
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include "kv_codes.h"
#include "threads.h"

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

/* ---- the kernel: three phases, each split into independent chunks for the thread pool (threads.c) ----
   1. scores, one chunk per (KV head, block or tail): S[h][pos] = scale * q_h . k_pos
   2. softmax, one chunk per query head: S[h] = exp(S[h] - max), inv[h] = 1 / sum (sequential, as before)
   3. values, one chunk per (KV head, slice of Dv channels): out[h][c] = sum_pos (S[h][pos] * inv[h]) v_pos[c]
   Every score, every softmax row and every output channel is computed by exactly the arithmetic of the
   one-thread kernel, in the same order (scores: fmadd over the channel vectors then kvq_hsum8; values:
   out = fmadd(p, v, out) over positions in order), so the result is bitwise the same on any number of
   threads. The AVX2 paths keep 4 tokens' score chains and a register tile of (heads x channels) output
   accumulators in flight (no store/reload of `out` per token): the same operations, fewer stalls. */

typedef struct {
    const float *lut, *q, *tk, *tv;
    float *out, *S, *inv;
    long H, Hkv, G, Dk, Dv, total, n_blocks, n_tail, tk_hs, tv_hs;
    const long *blocks, *start; /* start[b]: position of block b's first token (start[n_blocks]: the tail) */
    spec_t ks, vs;
    float scale;
    int avx, kfast, vfast, kmode, vmode; /* mode: kind * 2 + (bits == 8) */
    long vw, nslices; /* value chunk: vw channels (all Dv where not vfast) */
} attn_t;

/* Can the AVX2 paths read this tensor? (affine 4/8-bit, whole 8-channel vectors inside one group) */
static int fast_spec(const spec_t *sp, long D, int avx) {
    return avx && (sp->kind == 0 || sp->kind == 1) && (sp->bits == 4 || sp->bits == 8) && D % 8 == 0 &&
           (sp->kind == 1 || sp->G % 8 == 0);
}

#if defined(__AVX2__) && defined(__FMA__)
#define ATTN_INLINE static inline __attribute__((always_inline))

/* The AVX2 paths are compiled once per tensor layout (mode: kind 0/1 x 4/8 bits, constants after inlining):
   no layout branch or division per row. */
#define MODE_KIND(mode) ((mode) >> 1)
#define MODE_BITS(mode) ((mode) & 1 ? 8 : 4)

/* Where one block's tensor (one head) lies, and the running token group of a channel-axis tensor. */
typedef struct {
    const uint8_t *q;      /* head h's first row of codes */
    const uint16_t *s, *b; /* head h's first scale/bias row */
    long dp, ng, G, next;  /* bytes a row, groups a row (kind 0), group size, first token of the next group (kind 1) */
    float *sf, *bf;        /* kind 1: the current group's scale/bias per channel */
} lay_t;

ATTN_INLINE void lay_init(lay_t *l, const rows_t *r, const int mode) {
    long D = r->D, T = r->T, h = r->h;
    l->G = r->sp->G;
    l->dp = D * MODE_BITS(mode) / 8;
    l->q = r->q + h * T * l->dp;
    if (MODE_KIND(mode) == 1) {
        long n = (T + l->G - 1) / l->G;
        l->s = r->s + h * n * D;
        l->b = r->b + h * n * D;
    } else {
        l->ng = D / l->G;
        l->s = r->s + h * T * l->ng;
        l->b = r->b + h * T * l->ng;
    }
    l->next = 0;
    l->sf = r->sf;
    l->bf = r->bf;
}

/* Kind 1: entering token t, load its group's scale/bias when t starts a group (tokens come in order). */
ATTN_INLINE void lay_group(const float *lut, lay_t *l, long t, long D, const int mode) {
    if (MODE_KIND(mode) == 1 && t == l->next) {
        const uint16_t *s = l->s + (t / l->G) * D, *b = l->b + (t / l->G) * D;
        for (long i = 0; i < D; i++) { l->sf[i] = lut[s[i]]; l->bf[i] = lut[b[i]]; }
        l->next += l->G;
    }
}

ATTN_INLINE __m256 codes8(const uint8_t *qr, long c, const int mode) {
    return MODE_BITS(mode) == 4 ? codes4x8(qr + c / 2) : codes8x8(qr + c);
}

/* Row t (all D channels) dequantized into row: deq_row's AVX2 arithmetic. */
ATTN_INLINE void lay_row(const float *lut, lay_t *l, long t, long D, float *row, const int mode) {
    const uint8_t *qr = l->q + t * l->dp;
    lay_group(lut, l, t, D, mode);
    if (MODE_KIND(mode) == 1) {
        for (long j = 0; j < D; j += 8)
            _mm256_storeu_ps(row + j, _mm256_fmadd_ps(codes8(qr, j, mode), _mm256_loadu_ps(l->sf + j), _mm256_loadu_ps(l->bf + j)));
        return;
    }
    const uint16_t *sr = l->s + t * l->ng, *br = l->b + t * l->ng;
    for (long g = 0; g < l->ng; g++) {
        __m256 vs = _mm256_set1_ps(lut[sr[g]]), vb = _mm256_set1_ps(lut[br[g]]);
        for (long j = g * l->G; j < (g + 1) * l->G; j += 8)
            _mm256_storeu_ps(row + j, _mm256_fmadd_ps(codes8(qr, j, mode), vs, vb));
    }
}

/* Scores of n (<= 4) key rows (kb, Dk floats apart) against the G query heads: 4 independent chains. */
ATTN_INLINE void dot4(const float *qh, const float *kb, long n, long G, long Dk, float scale, float *S,
                      long total, long pos) {
    for (long g = 0; g < G; g++) {
        const float *qg = qh + g * Dk;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (long j = 0; j < Dk; j += 8) {
            __m256 qv = _mm256_loadu_ps(qg + j);
            a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kb + j), a0);
            if (n > 1) a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kb + Dk + j), a1);
            if (n > 2) a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kb + 2 * Dk + j), a2);
            if (n > 3) a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kb + 3 * Dk + j), a3);
        }
        float *sg = S + g * total + pos;
        sg[0] = kvq_hsum8(a0) * scale;
        if (n > 1) sg[1] = kvq_hsum8(a1) * scale;
        if (n > 2) sg[2] = kvq_hsum8(a2) * scale;
        if (n > 3) sg[3] = kvq_hsum8(a3) * scale;
    }
}

/* Phase 1, AVX2: one block's keys, 4 rows dequantized into kb then dotted together. */
ATTN_INLINE void scores_block(const attn_t *a, const rows_t *r, const float *qh, float *S, long pos, const int mode) {
    long Dk = a->Dk;
    float kb[4 * Dk];
    lay_t l;
    lay_init(&l, r, mode);
    for (long t0 = 0; t0 < r->T; t0 += 4) {
        long n = r->T - t0 < 4 ? r->T - t0 : 4;
        for (long u = 0; u < n; u++) lay_row(a->lut, &l, t0 + u, Dk, kb + u * Dk, mode);
        dot4(qh, kb, n, a->G, Dk, a->scale, S, a->total, pos + t0);
    }
}

static void scores_fast(const attn_t *a, const rows_t *r, const float *qh, float *S, long pos) {
    switch (a->kmode) {
    case 0: scores_block(a, r, qh, S, pos, 0); break;
    case 1: scores_block(a, r, qh, S, pos, 1); break;
    case 2: scores_block(a, r, qh, S, pos, 2); break;
    default: scores_block(a, r, qh, S, pos, 3); break;
    }
}

/* Phase 1, AVX2: the tail's keys (fp32 rows), 4 at a time. */
static void scores_tail_fast(const attn_t *a, const float *kr, const float *qh, float *S, long pos) {
    for (long t0 = 0; t0 < a->n_tail; t0 += 4) {
        long n = a->n_tail - t0 < 4 ? a->n_tail - t0 : 4;
        dot4(qh, kr + t0 * a->Dk, n, a->G, a->Dk, a->scale, S, a->total, pos + t0);
    }
}

/* Phase 3, AVX2: out[g0..g0+GB)[c0..c0+8NV) over every position, accumulators in registers. Each
   vector lies in one group (kind 0: G % 8 == 0), the same vs/vb deq_row uses for it. */
ATTN_INLINE void values_tile(const attn_t *a, long kh, long g0, long c0, const long GB, const long NV, const int mode) {
    __m256 acc[4][4];
    for (long g = 0; g < GB; g++)
        for (long v = 0; v < NV; v++) acc[g][v] = _mm256_setzero_ps();
    const float *S = a->S + (kh * a->G + g0) * a->total, *inv = a->inv + kh * a->G + g0;
    long Dv = a->Dv, pos = 0, total = a->total;
    float sfv[Dv], bfv[Dv];
    for (long b = 0; b < a->n_blocks; b++) {
        rows_t r;
        rows_init(&r, &a->vs, a->blocks + 8 * b, 1, kh, Dv, sfv, bfv);
        lay_t l;
        lay_init(&l, &r, mode);
        long gi[4];
        if (MODE_KIND(mode) == 0)
            for (long v = 0; v < NV; v++) gi[v] = (c0 + 8 * v) / l.G;
        for (long t = 0; t < r.T; t++, pos++) {
            const uint8_t *qr = l.q + t * l.dp;
            lay_group(a->lut, &l, t, Dv, mode);
            __m256 p[4];
            for (long g = 0; g < GB; g++) p[g] = _mm256_set1_ps(S[g * total + pos] * inv[g]);
            for (long v = 0; v < NV; v++) {
                __m256 x;
                if (MODE_KIND(mode) == 1) {
                    x = _mm256_fmadd_ps(codes8(qr, c0 + 8 * v, mode), _mm256_loadu_ps(l.sf + c0 + 8 * v),
                                        _mm256_loadu_ps(l.bf + c0 + 8 * v));
                } else {
                    const uint16_t *sr = l.s + t * l.ng, *br = l.b + t * l.ng;
                    x = _mm256_fmadd_ps(codes8(qr, c0 + 8 * v, mode), _mm256_set1_ps(a->lut[sr[gi[v]]]),
                                        _mm256_set1_ps(a->lut[br[gi[v]]]));
                }
                for (long g = 0; g < GB; g++) acc[g][v] = _mm256_fmadd_ps(p[g], x, acc[g][v]);
            }
        }
    }
    const float *vr = a->n_tail ? a->tv + kh * a->tv_hs + c0 : NULL;
    for (long t = 0; t < a->n_tail; t++, pos++, vr += Dv) {
        __m256 p[4];
        for (long g = 0; g < GB; g++) p[g] = _mm256_set1_ps(S[g * total + pos] * inv[g]);
        for (long v = 0; v < NV; v++) {
            __m256 x = _mm256_loadu_ps(vr + 8 * v);
            for (long g = 0; g < GB; g++) acc[g][v] = _mm256_fmadd_ps(p[g], x, acc[g][v]);
        }
    }
    for (long g = 0; g < GB; g++)
        for (long v = 0; v < NV; v++) _mm256_storeu_ps(a->out + (kh * a->G + g0 + g) * Dv + c0 + 8 * v, acc[g][v]);
}

/* Tiles: (1-3 heads x 4 vectors) or (4 heads x 2 vectors) for 32-channel slices (at most 12 accumulators),
   (<= 4 heads x 2 or 1 vectors) for 16/8-channel slices. */
ATTN_INLINE void values_mode(const attn_t *a, long kh, long c0, const int mode) {
    for (long g0 = 0; g0 < a->G; g0 += 4) {
        long GB = a->G - g0 < 4 ? a->G - g0 : 4;
        if (a->vw == 32 && GB < 4) {
            if (GB == 1) values_tile(a, kh, g0, c0, 1, 4, mode);
            else if (GB == 2) values_tile(a, kh, g0, c0, 2, 4, mode);
            else values_tile(a, kh, g0, c0, 3, 4, mode);
            continue;
        }
        for (long c = c0; c < c0 + a->vw; c += a->vw == 8 ? 8 : 16) {
            if (a->vw == 8) {
                if (GB == 1) values_tile(a, kh, g0, c, 1, 1, mode);
                else if (GB == 2) values_tile(a, kh, g0, c, 2, 1, mode);
                else if (GB == 3) values_tile(a, kh, g0, c, 3, 1, mode);
                else values_tile(a, kh, g0, c, 4, 1, mode);
            } else {
                if (GB == 1) values_tile(a, kh, g0, c, 1, 2, mode);
                else if (GB == 2) values_tile(a, kh, g0, c, 2, 2, mode);
                else if (GB == 3) values_tile(a, kh, g0, c, 3, 2, mode);
                else values_tile(a, kh, g0, c, 4, 2, mode);
            }
        }
    }
}

/* Phase 3, AVX2: one slice of vw channels of KV head kh, for all its query heads. */
static void values_fast(const attn_t *a, long kh, long c0) {
    switch (a->vmode) {
    case 0: values_mode(a, kh, c0, 0); break;
    case 1: values_mode(a, kh, c0, 1); break;
    case 2: values_mode(a, kh, c0, 2); break;
    default: values_mode(a, kh, c0, 3); break;
    }
}
#endif

/* Phase 1 chunk: (KV head, block), the tail being block n_blocks. */
static void phase_scores(void *arg, long i) {
    const attn_t *a = arg;
    long nb1 = a->n_blocks + (a->n_tail > 0), kh = i / nb1, b = i % nb1, G = a->G, Dk = a->Dk, total = a->total;
    const float *qh = a->q + kh * G * Dk;
    float *S = a->S + kh * G * total;
    long pos = a->start[b];
    if (b == a->n_blocks) {
        const float *kr = a->tk + kh * a->tk_hs;
#if defined(__AVX2__) && defined(__FMA__)
        if (a->avx && Dk % 8 == 0) {
            scores_tail_fast(a, kr, qh, S, pos);
            return;
        }
#endif
        for (long t = 0; t < a->n_tail; t++, pos++)
            for (long g = 0; g < G; g++) S[g * total + pos] = dot(qh + g * Dk, kr + t * Dk, Dk, a->avx) * a->scale;
        return;
    }
    float sfk[Dk], bfk[Dk];
    rows_t r;
    rows_init(&r, &a->ks, a->blocks + 8 * b, 0, kh, Dk, sfk, bfk);
#if defined(__AVX2__) && defined(__FMA__)
    if (a->kfast) {
        scores_fast(a, &r, qh, S, pos);
        return;
    }
#endif
    float krow[Dk];
    for (long t = 0; t < r.T; t++, pos++) {
        deq_row(a->lut, &r, t, krow, a->avx);
        for (long g = 0; g < G; g++) S[g * total + pos] = dot(qh + g * Dk, krow, Dk, a->avx) * a->scale;
    }
}

/* Phase 2 chunk: query head h's softmax numerators in place, and 1 / their sum. */
static void phase_softmax(void *arg, long h) {
    const attn_t *a = arg;
    long total = a->total;
    float *s = a->S + h * total, m = -FLT_MAX, sum = 0.f;
    for (long t = 0; t < total; t++) m = s[t] > m ? s[t] : m;
    for (long t = 0; t < total; t++) { float e = expf(s[t] - m); s[t] = e; sum += e; }
    a->inv[h] = 1.f / sum;
}

/* Phase 3 chunk: (KV head, channel slice). */
static void phase_values(void *arg, long i) {
    const attn_t *a = arg;
    long kh = i / a->nslices, G = a->G, Dv = a->Dv, total = a->total;
#if defined(__AVX2__) && defined(__FMA__)
    if (a->vfast) {
        values_fast(a, kh, (i % a->nslices) * a->vw);
        return;
    }
#endif
    const float *S = a->S + kh * G * total, *inv = a->inv + kh * G;
    for (long g = 0; g < G; g++) memset(a->out + (kh * G + g) * Dv, 0, sizeof(float) * Dv);
    float vrow[Dv], sfv[Dv], bfv[Dv];
    long pos = 0;
    for (long b = 0; b < a->n_blocks; b++) {
        rows_t r;
        rows_init(&r, &a->vs, a->blocks + 8 * b, 1, kh, Dv, sfv, bfv);
        for (long t = 0; t < r.T; t++, pos++) {
            deq_row(a->lut, &r, t, vrow, a->avx);
            for (long g = 0; g < G; g++) axpy(a->out + (kh * G + g) * Dv, S[g * total + pos] * inv[g], vrow, Dv, a->avx);
        }
    }
    for (long t = 0; t < a->n_tail; t++, pos++) {
        const float *vr = a->tv + kh * a->tv_hs + t * Dv;
        for (long g = 0; g < G; g++) axpy(a->out + (kh * G + g) * Dv, S[g * total + pos] * inv[g], vr, Dv, a->avx);
    }
}

/* The scores of all H heads (the caller's scratch holds only G * total: one KV head's): grown per thread. */
static float *scores_buffer(long n) {
    static __thread float *buf;
    static __thread long cap;
    if (n > cap) {
        float *grown = realloc(buf, sizeof(float) * n);
        if (!grown) return NULL;
        buf = grown;
        cap = n;
    }
    return buf;
}

static void run_phase(parley_chunk_fn fn, attn_t *a, long chunks, int threaded) {
    if (threaded) {
        parley_parallel_for(fn, a, chunks);
        return;
    }
    for (long i = 0; i < chunks; i++) fn(a, i);
}

/* out[H][Dv] = softmax(scale q_h K^T) V over the sealed blocks then the tail, for one query position.
   q: H x Dk floats (query heads kh*G .. kh*G+G-1 share KV head kh). scratch: G * (total tokens) floats.
   tail rows: tk + kh * tk_hs + t * Dk (contiguous rows, heads tk_hs floats apart); same for tv. */
void KFN(kvq_attn_decode)(const float *lut, const float *q, float *out, float *scratch,
                     long H, long Hkv, long Dk, long Dv, float scale,
                     const long *kspec, const long *vspec, long n_blocks, const long *blocks,
                     const float *tk, const float *tv, long n_tail, long tk_hs, long tv_hs, long isa) {
    attn_t a = {.lut = lut, .q = q, .tk = tk, .tv = tv, .out = out, .H = H, .Hkv = Hkv, .G = H / Hkv,
                .Dk = Dk, .Dv = Dv, .n_blocks = n_blocks, .n_tail = n_tail, .tk_hs = tk_hs, .tv_hs = tv_hs,
                .blocks = blocks, .ks = {kspec[0], kspec[1], kspec[2]}, .vs = {vspec[0], vspec[1], vspec[2]},
                .scale = scale, .avx = isa == 1 && KFN(kvq_has_avx2)()};
    long start[n_blocks + 1], total = 0;
    for (long b = 0; b < n_blocks; b++) { start[b] = total; total += blocks[8 * b + 6]; }
    start[n_blocks] = total;
    total += n_tail;
    if (total < 1) return;
    float inv[H];
    a.start = start;
    a.total = total;
    a.inv = inv;
    a.S = Hkv == 1 ? scratch : scores_buffer(H * total);
    int threaded = parley_threads() > 1 && total * H * (Dk + Dv) >= parley_min_work();
    if (a.S == NULL) { /* no memory for all heads' scores: one KV head at a time in the caller's scratch */
        for (long kh = 0; kh < Hkv; kh++) {
            long qo = kh * a.G * Dk, oo = kh * a.G * Dv;
            KFN(kvq_attn_decode)(lut, q + qo, out + oo, scratch, a.G, 1, Dk, Dv, scale, kspec, vspec, n_blocks,
                                 blocks, tk ? tk + kh * tk_hs : tk, tv ? tv + kh * tv_hs : tv, n_tail, tk_hs, tv_hs, isa);
        }
        return;
    }
    a.kfast = fast_spec(&a.ks, Dk, a.avx);
    a.vfast = fast_spec(&a.vs, Dv, a.avx);
    a.kmode = (int)(a.ks.kind * 2 + (a.ks.bits == 8));
    a.vmode = (int)(a.vs.kind * 2 + (a.vs.bits == 8));
    a.vw = !a.vfast ? Dv : Dv % 32 == 0 ? 32 : Dv % 16 == 0 ? 16 : 8;
    a.nslices = Dv / a.vw;
    run_phase(phase_scores, &a, Hkv * (n_blocks + (n_tail > 0)), threaded);
    run_phase(phase_softmax, &a, H, threaded);
    run_phase(phase_values, &a, Hkv * a.nslices, threaded);
}
