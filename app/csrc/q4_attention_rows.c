/* Causal attention of a short prefill chunk (L query rows, the last L positions) straight over the sealed
   blocks in their encoded form plus the fp32 tail: a resumed conversation's new message (a few dozen
   tokens) over its restored 4K context.

   The path it replaces decoded every block of every layer into an fp32 scratch (~6 MB a layer at 4K)
   and multiplied through BLAS: for L rows that is a thin sgemm whose threads, on a busy 2-core machine,
   waited on each other longer than the math took. Here each key row is dequantized once (in registers)
   and dotted with all G * L query rows that share its KV head, and each value slice is dequantized once
   a block into an L1 buffer and accumulated into register tiles of output rows.

   Uses q4_attention.c's pieces (same translation unit), with `G` set to G * L (the rows of KV head kh are
   contiguous in q's (H, L, Dk) layout):
   1. scores, one chunk per (KV head, block or tail): the portable path is phase_scores unchanged; the AVX2
      one dequantizes 8 key rows (16 in the AVX-512 variant), transposes them and scores 8 query rows at a
      time against them (one vector of 8 or 16 scores a row: no horizontal sums);
   2. softmax, one chunk per row (h, l): row l sees positions [0, total - L + l]; its weights are
      normalized in place (e * (1 / sum), the decode kernel's arithmetic) and the masked ones set to 0;
   3. values, one chunk per (KV head, channel slice): out[l][h][c] = sum over positions in order of
      p * v (masked positions add +-0: the same sum).
   Every output is computed by one chunk, by the same operations in the same order on any number of
   threads: bitwise the same results on 1 or 2 threads. Against attention over the decoded fp32 copy
   the results agree within fp32 rounding (sums in another order than BLAS's).

   q: (H, L, Dk) fp32, query head h = kh * G + g on KV head kh. out: (L, H, Dv) fp32 (o_proj's input
   layout). The chunk's own keys/values are the last L positions (appended first; sealing may have moved
   some of them into the last block, which is how the fp32 path sees them too). Returns -1 (nothing
   written) when total < L or the scores do not fit in memory. */

#define ROWS_VW 16 /* value channels a phase-3 chunk covers (fast path) */

typedef struct {
    attn_t a;  /* G = G * L rows a KV head */
    long L, H;
} rows_attn_t;

/* Phase 2 chunk: row r = h * L + l. */
static void phase_softmax_rows(void *arg, long r) {
    const rows_attn_t *ra = arg;
    long total = ra->a.total, n = total - ra->L + r % ra->L + 1;
    float *s = ra->a.S + r * total, m = -FLT_MAX, sum = 0.f;
    for (long t = 0; t < n; t++) m = s[t] > m ? s[t] : m;
    for (long t = 0; t < n; t++) { float e = expf(s[t] - m); s[t] = e; sum += e; }
    float inv = 1.f / sum;
    for (long t = 0; t < n; t++) s[t] *= inv;
    for (long t = n; t < total; t++) s[t] = 0.f;
}

/* out row (h, l) of chunk row index i = g * L + l of KV head kh */
static inline float *rows_out(const rows_attn_t *ra, long kh, long i) {
    long G = ra->a.G / ra->L, g = i / ra->L, l = i % ra->L;
    return ra->a.out + (l * ra->H + kh * G + g) * ra->a.Dv;
}

/* Phase 3 chunk, portable: KV head kh, every channel. */
static void values_rows_plain(const rows_attn_t *ra, long kh) {
    const attn_t *a = &ra->a;
    long R = a->G, Dv = a->Dv, total = a->total;
    const float *S = a->S + kh * R * total;
    for (long i = 0; i < R; i++) memset(rows_out(ra, kh, i), 0, sizeof(float) * Dv);
    float vrow[Dv], sfv[Dv], bfv[Dv];
    long pos = 0;
    for (long b = 0; b < a->n_blocks; b++) {
        rows_t r;
        rows_init(&r, &a->vs, a->blocks + 8 * b, 1, kh, Dv, sfv, bfv);
        for (long t = 0; t < r.T; t++, pos++) {
            deq_row(a->lut, &r, t, vrow, a->avx);
            for (long i = 0; i < R; i++) axpy(rows_out(ra, kh, i), S[i * total + pos], vrow, Dv, a->avx);
        }
    }
    for (long t = 0; t < a->n_tail; t++, pos++) {
        const float *vr = a->tv + kh * a->tv_hs + t * Dv;
        for (long i = 0; i < R; i++) axpy(rows_out(ra, kh, i), S[i * total + pos], vr, Dv, a->avx);
    }
}

#if defined(__AVX2__) && defined(__FMA__)
/* Scores of NR query rows (qr: Dk floats apart) against 8 keys held transposed in kt (Dk x 8): one vector of 8
   scores a row, 8 independent accumulators (no horizontal sums). */
ATTN_INLINE void scores_kt(const float *kt, const float *qr, long Dk, float scale, float *S, long total, long pos,
                           long n, const long NR) {
    __m256 acc[8];
    for (long i = 0; i < NR; i++) acc[i] = _mm256_setzero_ps();
    for (long j = 0; j < Dk; j++) {
        __m256 x = _mm256_loadu_ps(kt + 8 * j);
        for (long i = 0; i < NR; i++) acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(qr[i * Dk + j]), x, acc[i]);
    }
    __m256 vs = _mm256_set1_ps(scale);
    for (long i = 0; i < NR; i++) {
        float *s = S + i * total + pos;
        if (n == 8) {
            _mm256_storeu_ps(s, _mm256_mul_ps(acc[i], vs));
        } else {
            float tmp[8];
            _mm256_storeu_ps(tmp, _mm256_mul_ps(acc[i], vs));
            for (long u = 0; u < n; u++) s[u] = tmp[u];
        }
    }
}

/* kt[ks j + u] = kb[u Dk + j] for channels [j0, j0 + 8) of 8 key rows (an 8 x 8 transpose in registers). */
static inline void transpose8(const float *kb, long Dk, long j0, float *kt, long ks) {
    __m256 r[8], t[8], s[8];
    for (int u = 0; u < 8; u++) r[u] = _mm256_loadu_ps(kb + u * Dk + j0);
    for (int u = 0; u < 8; u += 2) {
        t[u] = _mm256_unpacklo_ps(r[u], r[u + 1]);
        t[u + 1] = _mm256_unpackhi_ps(r[u], r[u + 1]);
    }
    for (int u = 0; u < 8; u += 4) {
        s[u] = _mm256_shuffle_ps(t[u], t[u + 2], 0x44);
        s[u + 1] = _mm256_shuffle_ps(t[u], t[u + 2], 0xEE);
        s[u + 2] = _mm256_shuffle_ps(t[u + 1], t[u + 3], 0x44);
        s[u + 3] = _mm256_shuffle_ps(t[u + 1], t[u + 3], 0xEE);
    }
    for (int j = 0; j < 4; j++) {
        _mm256_storeu_ps(kt + ks * (j0 + j), _mm256_permute2f128_ps(s[j], s[j + 4], 0x20));
        _mm256_storeu_ps(kt + ks * (j0 + j + 4), _mm256_permute2f128_ps(s[j], s[j + 4], 0x31));
    }
}

/* n (<= 8) key rows kb (Dk floats apart, room for 8) transposed into kt, then every row's scores, 8 rows at a
   time. Rows n..7 are zero-filled (their lanes are computed and never stored). */
__attribute__((unused)) static void scores_rows8(const float *kb, long n, const float *qh, long R, long Dk, float scale, float *S, long total,
                         long pos) {
    float kt[8 * Dk], pad[8 * Dk];
    if (n < 8) {
        memset(pad, 0, sizeof(float) * 8 * Dk);
        memcpy(pad, kb, sizeof(float) * n * Dk);
        kb = pad;
    }
    for (long j0 = 0; j0 < Dk; j0 += 8) transpose8(kb, Dk, j0, kt, 8);
    long i0 = 0;
    for (; i0 + 8 <= R; i0 += 8) scores_kt(kt, qh + i0 * Dk, Dk, scale, S + i0 * total, total, pos, n, 8);
    for (; i0 + 4 <= R; i0 += 4) scores_kt(kt, qh + i0 * Dk, Dk, scale, S + i0 * total, total, pos, n, 4);
    for (; i0 < R; i0++) scores_kt(kt, qh + i0 * Dk, Dk, scale, S + i0 * total, total, pos, n, 1);
}

#ifdef __AVX512F__
/* scores_kt with 16 keys a vector (AVX-512): the same products and sums per score, twice the keys an FMA. */
ATTN_INLINE void scores_kt16(const float *kt, const float *qr, long Dk, float scale, float *S, long total, long pos,
                             long n, const long NR) {
    __m512 acc[8];
    for (long i = 0; i < NR; i++) acc[i] = _mm512_setzero_ps();
    for (long j = 0; j < Dk; j++) {
        __m512 x = _mm512_loadu_ps(kt + 16 * j);
        for (long i = 0; i < NR; i++) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(qr[i * Dk + j]), x, acc[i]);
    }
    __m512 vs = _mm512_set1_ps(scale);
    __mmask16 keep = (__mmask16)(n >= 16 ? 0xFFFF : (1u << n) - 1);
    for (long i = 0; i < NR; i++) _mm512_mask_storeu_ps(S + i * total + pos, keep, _mm512_mul_ps(acc[i], vs));
}

/* scores_rows8 for up to 16 key rows. */
static void scores_rows16(const float *kb, long n, const float *qh, long R, long Dk, float scale, float *S, long total,
                          long pos) {
    float kt[16 * Dk], pad[16 * Dk];
    if (n < 16) {
        memset(pad, 0, sizeof(float) * 16 * Dk);
        memcpy(pad, kb, sizeof(float) * n * Dk);
        kb = pad;
    }
    for (long j0 = 0; j0 < Dk; j0 += 8) {
        transpose8(kb, Dk, j0, kt, 16);
        transpose8(kb + 8 * Dk, Dk, j0, kt + 8, 16);
    }
    long i0 = 0;
    for (; i0 + 8 <= R; i0 += 8) scores_kt16(kt, qh + i0 * Dk, Dk, scale, S + i0 * total, total, pos, n, 8);
    for (; i0 + 4 <= R; i0 += 4) scores_kt16(kt, qh + i0 * Dk, Dk, scale, S + i0 * total, total, pos, n, 4);
    for (; i0 < R; i0++) scores_kt16(kt, qh + i0 * Dk, Dk, scale, S + i0 * total, total, pos, n, 1);
}
#define ROWS_KEYS 16
#define SCORES_ROWS scores_rows16
#else
#define ROWS_KEYS 8
#define SCORES_ROWS scores_rows8
#endif

/* Phase 1, AVX2: one block's keys, ROWS_KEYS rows dequantized then scored against every row. */
ATTN_INLINE void scores_rows_block(const attn_t *a, const rows_t *r, const float *qh, float *S, long pos, const int mode) {
    long Dk = a->Dk;
    float kb[ROWS_KEYS * Dk];
    lay_t l;
    lay_init(&l, r, mode);
    for (long t0 = 0; t0 < r->T; t0 += ROWS_KEYS) {
        long n = r->T - t0 < ROWS_KEYS ? r->T - t0 : ROWS_KEYS;
        for (long u = 0; u < n; u++) lay_row(a->lut, &l, t0 + u, Dk, kb + u * Dk, mode);
        SCORES_ROWS(kb, n, qh, a->G, Dk, a->scale, S, a->total, pos + t0);
    }
}

/* Phase 1 chunk, AVX2 (keys the fast paths read): (KV head, block), the tail being block n_blocks. */
static void scores_rows_fast(const attn_t *a, long i) {
    long nb1 = a->n_blocks + (a->n_tail > 0), kh = i / nb1, b = i % nb1, Dk = a->Dk;
    const float *qh = a->q + kh * a->G * Dk;
    float *S = a->S + kh * a->G * a->total;
    long pos = a->start[b];
    if (b == a->n_blocks) {
        const float *kr = a->tk + kh * a->tk_hs;
        for (long t0 = 0; t0 < a->n_tail; t0 += ROWS_KEYS) {
            long n = a->n_tail - t0 < ROWS_KEYS ? a->n_tail - t0 : ROWS_KEYS;
            SCORES_ROWS(kr + t0 * Dk, n, qh, a->G, Dk, a->scale, S, a->total, pos + t0);
        }
        return;
    }
    float sfk[Dk], bfk[Dk];
    rows_t r;
    rows_init(&r, &a->ks, a->blocks + 8 * b, 0, kh, Dk, sfk, bfk);
    switch (a->kmode) {
    case 0: scores_rows_block(a, &r, qh, S, pos, 0); break;
    case 1: scores_rows_block(a, &r, qh, S, pos, 1); break;
    case 2: scores_rows_block(a, &r, qh, S, pos, 2); break;
    default: scores_rows_block(a, &r, qh, S, pos, 3); break;
    }
}

/* n rows x NV vectors of output accumulated over T positions of buf (T rows, `stride` floats apart):
   acc (in memory between calls: one load and store per block) += p[pos] * buf[t]. */
ATTN_INLINE void rows_tile(float *const *outs, const float *const *ps, long pos, const float *buf, long stride,
                           long T, const long n, const long NV) {
    __m256 acc[4][2];
    for (long i = 0; i < n; i++)
        for (long v = 0; v < NV; v++) acc[i][v] = _mm256_loadu_ps(outs[i] + 8 * v);
    for (long t = 0; t < T; t++) {
        __m256 x0 = _mm256_loadu_ps(buf + t * stride), x1 = NV > 1 ? _mm256_loadu_ps(buf + t * stride + 8) : x0;
        for (long i = 0; i < n; i++) {
            __m256 p = _mm256_set1_ps(ps[i][pos + t]);
            acc[i][0] = _mm256_fmadd_ps(p, x0, acc[i][0]);
            if (NV > 1) acc[i][1] = _mm256_fmadd_ps(p, x1, acc[i][1]);
        }
    }
    for (long i = 0; i < n; i++)
        for (long v = 0; v < NV; v++) _mm256_storeu_ps(outs[i] + 8 * v, acc[i][v]);
}

#ifdef __AVX512F__
/* rows_tile for a 16-channel slice in one AVX-512 vector a row, up to 8 rows: the same fmadd per channel, in
   the same order (bitwise rows_tile's results). */
ATTN_INLINE void rows_tile16(float *const *outs, const float *const *ps, long pos, const float *buf, long stride,
                             long T, const long n) {
    __m512 acc[8];
    for (long i = 0; i < n; i++) acc[i] = _mm512_loadu_ps(outs[i]);
    for (long t = 0; t < T; t++) {
        __m512 x = _mm512_loadu_ps(buf + t * stride);
        for (long i = 0; i < n; i++) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(ps[i][pos + t]), x, acc[i]);
    }
    for (long i = 0; i < n; i++) _mm512_storeu_ps(outs[i], acc[i]);
}
#endif

/* Every chunk row's slice [c0, c0 + vw) over T positions of buf, in tiles of up to 4 rows (8 in AVX-512). */
static void rows_span(const rows_attn_t *ra, long kh, long c0, long vw, long pos, const float *buf, long stride,
                      long T) {
    const attn_t *a = &ra->a;
    long R = a->G;
    const float *S = a->S + kh * R * a->total;
#ifdef __AVX512F__
    if (vw == 16) {
        for (long i0 = 0; i0 < R; i0 += 8) {
            long n = R - i0 < 8 ? R - i0 : 8;
            float *outs[8] = {0};
            const float *ps[8] = {0};
            for (long i = 0; i < n; i++) { outs[i] = rows_out(ra, kh, i0 + i) + c0; ps[i] = S + (i0 + i) * a->total; }
            if (n == 8) rows_tile16(outs, ps, pos, buf, stride, T, 8);
            else if (n >= 4) {
                rows_tile16(outs, ps, pos, buf, stride, T, 4);
                for (long i = 4; i < n; i++) rows_tile16(outs + i, ps + i, pos, buf, stride, T, 1);
            } else {
                for (long i = 0; i < n; i++) rows_tile16(outs + i, ps + i, pos, buf, stride, T, 1);
            }
        }
        return;
    }
#endif
    for (long i0 = 0; i0 < R; i0 += 4) {
        long n = R - i0 < 4 ? R - i0 : 4;
        float *outs[4];
        const float *ps[4];
        for (long i = 0; i < n; i++) { outs[i] = rows_out(ra, kh, i0 + i) + c0; ps[i] = S + (i0 + i) * a->total; }
        if (vw == 16) {
            if (n == 4) rows_tile(outs, ps, pos, buf, stride, T, 4, 2);
            else if (n == 3) rows_tile(outs, ps, pos, buf, stride, T, 3, 2);
            else if (n == 2) rows_tile(outs, ps, pos, buf, stride, T, 2, 2);
            else rows_tile(outs, ps, pos, buf, stride, T, 1, 2);
        } else {
            if (n == 4) rows_tile(outs, ps, pos, buf, stride, T, 4, 1);
            else if (n == 3) rows_tile(outs, ps, pos, buf, stride, T, 3, 1);
            else if (n == 2) rows_tile(outs, ps, pos, buf, stride, T, 2, 1);
            else rows_tile(outs, ps, pos, buf, stride, T, 1, 1);
        }
    }
}

/* One block's value slice [c0, c0 + vw) dequantized into buf (T rows of vw floats): deq_row's arithmetic. */
ATTN_INLINE void deq_slice(const float *lut, const rows_t *r, long c0, long vw, float *buf, const int mode) {
    lay_t l;
    lay_init(&l, r, mode);
    long D = r->D;
    for (long t = 0; t < r->T; t++) {
        const uint8_t *qr = l.q + t * l.dp;
        lay_group(lut, &l, t, D, mode);
        for (long c = c0; c < c0 + vw; c += 8) {
            __m256 x;
            if (MODE_KIND(mode) == 1) {
                x = _mm256_fmadd_ps(codes8(qr, c, mode), _mm256_loadu_ps(l.sf + c), _mm256_loadu_ps(l.bf + c));
            } else {
                const uint16_t *sr = l.s + t * l.ng, *br = l.b + t * l.ng;
                long g = c / l.G;
                x = _mm256_fmadd_ps(codes8(qr, c, mode), _mm256_set1_ps(lut[sr[g]]), _mm256_set1_ps(lut[br[g]]));
            }
            _mm256_storeu_ps(buf + t * vw + (c - c0), x);
        }
    }
}

static void deq_slice_mode(const attn_t *a, const rows_t *r, long c0, long vw, float *buf) {
    switch (a->vmode) {
    case 0: deq_slice(a->lut, r, c0, vw, buf, 0); break;
    case 1: deq_slice(a->lut, r, c0, vw, buf, 1); break;
    case 2: deq_slice(a->lut, r, c0, vw, buf, 2); break;
    default: deq_slice(a->lut, r, c0, vw, buf, 3); break;
    }
}

/* Phase 3 chunk, AVX2: KV head kh, channels [c0, c0 + vw). */
static void values_rows_fast(const rows_attn_t *ra, long kh, long c0) {
    const attn_t *a = &ra->a;
    long Dv = a->Dv, vw = a->vw, pos = 0, cap = 0;
    for (long b = 0; b < a->n_blocks; b++) cap = a->blocks[8 * b + 6] > cap ? a->blocks[8 * b + 6] : cap;
    for (long i = 0; i < a->G; i++) memset(rows_out(ra, kh, i) + c0, 0, sizeof(float) * vw);
    float sfv[Dv], bfv[Dv];
    float *buf = cap ? malloc(sizeof(float) * cap * vw) : NULL;
    if (cap && buf == NULL) { /* no memory for the slice buffer: dequantize row by row */
        float vrow[Dv];
        for (long b = 0; b < a->n_blocks; b++) {
            rows_t r;
            rows_init(&r, &a->vs, a->blocks + 8 * b, 1, kh, Dv, sfv, bfv);
            for (long t = 0; t < r.T; t++, pos++) {
                deq_row(a->lut, &r, t, vrow, a->avx);
                rows_span(ra, kh, c0, vw, pos, vrow + c0, 0, 1);
            }
        }
    } else {
        for (long b = 0; b < a->n_blocks; b++) {
            rows_t r;
            rows_init(&r, &a->vs, a->blocks + 8 * b, 1, kh, Dv, sfv, bfv);
            deq_slice_mode(a, &r, c0, vw, buf);
            rows_span(ra, kh, c0, vw, pos, buf, vw, r.T);
            pos += r.T;
        }
        free(buf);
    }
    if (a->n_tail) rows_span(ra, kh, c0, vw, pos, a->tv + kh * a->tv_hs + c0, Dv, a->n_tail);
}
#endif

static void phase_values_rows(void *arg, long i) {
    const rows_attn_t *ra = arg;
#if defined(__AVX2__) && defined(__FMA__)
    if (ra->a.vfast) {
        values_rows_fast(ra, i / ra->a.nslices, (i % ra->a.nslices) * ra->a.vw);
        return;
    }
#endif
    values_rows_plain(ra, i);
}

static void phase_scores_rows(void *arg, long i) {
    const attn_t *a = &((rows_attn_t *)arg)->a;
#if defined(__AVX2__) && defined(__FMA__)
    if (a->kfast) {
        scores_rows_fast(a, i);
        return;
    }
#endif
    phase_scores((void *)a, i);
}

/* out (L, H, Dv) = causal softmax(scale q K^T) V for the last L positions over the sealed blocks then the
   tail. Returns 0, or -1 (see above). */
int KFN(kvq_attn_rows)(const float *lut, const float *q, float *out, long H, long Hkv, long L, long Dk, long Dv,
                       float scale, const long *kspec, const long *vspec, long n_blocks, const long *blocks,
                       const float *tk, const float *tv, long n_tail, long tk_hs, long tv_hs, long isa) {
    if (L < 1 || n_tail < 0 || H % Hkv) return -1;
    rows_attn_t ra = {.a = {.lut = lut, .q = q, .tk = tk, .tv = tv, .out = out, .H = H, .Hkv = Hkv,
                            .G = H / Hkv * L, .Dk = Dk, .Dv = Dv, .n_blocks = n_blocks, .n_tail = n_tail,
                            .tk_hs = tk_hs, .tv_hs = tv_hs, .blocks = blocks,
                            .ks = {kspec[0], kspec[1], kspec[2]}, .vs = {vspec[0], vspec[1], vspec[2]},
                            .scale = scale, .avx = isa == 1 && KFN(kvq_has_avx2)()},
                      .L = L, .H = H};
    attn_t *a = &ra.a;
    long start[n_blocks + 1], total = 0;
    for (long b = 0; b < n_blocks; b++) { start[b] = total; total += blocks[8 * b + 6]; }
    start[n_blocks] = total;
    total += n_tail;
    if (total < L) return -1;
    a->start = start;
    a->total = total;
    a->inv = NULL;
    a->S = scores_buffer(H * L * total);
    if (a->S == NULL) return -1;
    a->kfast = fast_spec(&a->ks, Dk, a->avx);
    a->vfast = fast_spec(&a->vs, Dv, a->avx);
    a->kmode = (int)(a->ks.kind * 2 + (a->ks.bits == 8));
    a->vmode = (int)(a->vs.kind * 2 + (a->vs.bits == 8));
    a->vw = !a->vfast ? Dv : Dv % 16 == 0 ? 16 : 8;
    a->nslices = Dv / a->vw;
    int threaded = parley_threads() > 1 && total * H * L * (Dk + Dv) >= parley_min_work();
    run_phase(phase_scores_rows, (attn_t *)&ra, Hkv * (n_blocks + (n_tail > 0)), threaded);
    run_phase(phase_softmax_rows, (attn_t *)&ra, H * L, threaded);
    run_phase(phase_values_rows, (attn_t *)&ra, Hkv * a->nslices, threaded);
    return 0;
}
