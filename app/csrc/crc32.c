/* CRC-32 (zlib's: reflected polynomial 0xEDB88320), the checksum of every cache file, recomputed over every
   stored byte on each restore (app.kvstore.blockfile.checksum).

   zlib's table-driven crc32 runs at ~0.3-1.5 GB/s on these machines: ~90 ms of a 4K conversation's resume
   (28 MB). Carry-less multiplication folds 64 bytes at a time instead (Intel's "Fast CRC Computation for
   Generic Polynomials Using PCLMULQDQ", the constants zlib/Chromium's crc32_simd uses for this polynomial):
   the same CRC value, ~10x faster. Variants without AVX2 (and CPUs without PCLMULQDQ) run a byte-at-a-time
   table loop instead, the same value again; app.kvstore.blockfile uses zlib there, so it asks
   `crc32_fast` first.

   Contract: crc32_update(crc, buf, len) == zlib.crc32(buf[:len], crc) for every crc, buf and len >= 0. */

static uint32_t KFN(crc32_table)[256];
static int KFN(crc32_table_ready);

static void KFN(crc32_make_table)(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        KFN(crc32_table)[n] = c;
    }
    __atomic_store_n(&KFN(crc32_table_ready), 1, __ATOMIC_RELEASE);
}

/* The plain loop on the pre-inverted register (no final inversion). */
static uint32_t KFN(crc32_bytes)(uint32_t c, const unsigned char *buf, long len) {
    if (!__atomic_load_n(&KFN(crc32_table_ready), __ATOMIC_ACQUIRE)) KFN(crc32_make_table)();
    for (long i = 0; i < len; i++) c = KFN(crc32_table)[(c ^ buf[i]) & 0xff] ^ (c >> 8);
    return c;
}

#if defined(__AVX2__) && (defined(__x86_64__) || defined(__i386__))
#define PARLEY_CRC_FOLD 1

/* The pre-inverted register c folded over len bytes (len >= 64, a multiple of 16). */
__attribute__((target("pclmul,sse4.1"))) static uint32_t KFN(crc32_fold)(uint32_t c, const unsigned char *buf,
                                                                          long len) {
    const __m128i k1k2 = _mm_set_epi64x(0x01c6e41596LL, 0x0154442bd4LL);
    const __m128i k3k4 = _mm_set_epi64x(0x00ccaa009eLL, 0x01751997d0LL);
    const __m128i k5k0 = _mm_set_epi64x(0, 0x0163cd6124LL);
    const __m128i poly = _mm_set_epi64x(0x01f7011641LL, 0x01db710641LL);
    __m128i x0, x1, x2, x3, x4, x5, x6, x7, x8;
    x1 = _mm_loadu_si128((const __m128i *)(buf + 0x00));
    x2 = _mm_loadu_si128((const __m128i *)(buf + 0x10));
    x3 = _mm_loadu_si128((const __m128i *)(buf + 0x20));
    x4 = _mm_loadu_si128((const __m128i *)(buf + 0x30));
    x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128((int)c));
    x0 = k1k2;
    buf += 64;
    len -= 64;
    while (len >= 64) { /* four 16-byte lanes folded 64 bytes forward */
        x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
        x6 = _mm_clmulepi64_si128(x2, x0, 0x00);
        x7 = _mm_clmulepi64_si128(x3, x0, 0x00);
        x8 = _mm_clmulepi64_si128(x4, x0, 0x00);
        x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
        x2 = _mm_clmulepi64_si128(x2, x0, 0x11);
        x3 = _mm_clmulepi64_si128(x3, x0, 0x11);
        x4 = _mm_clmulepi64_si128(x4, x0, 0x11);
        x1 = _mm_xor_si128(_mm_xor_si128(x1, x5), _mm_loadu_si128((const __m128i *)(buf + 0x00)));
        x2 = _mm_xor_si128(_mm_xor_si128(x2, x6), _mm_loadu_si128((const __m128i *)(buf + 0x10)));
        x3 = _mm_xor_si128(_mm_xor_si128(x3, x7), _mm_loadu_si128((const __m128i *)(buf + 0x20)));
        x4 = _mm_xor_si128(_mm_xor_si128(x4, x8), _mm_loadu_si128((const __m128i *)(buf + 0x30)));
        buf += 64;
        len -= 64;
    }
    x0 = k3k4; /* the four lanes into one */
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x1, x0, 0x11), x2), x5);
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x1, x0, 0x11), x3), x5);
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x1, x0, 0x11), x4), x5);
    while (len >= 16) { /* what is left, 16 bytes at a time */
        x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
        x1 = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x1, x0, 0x11), _mm_loadu_si128((const __m128i *)buf)), x5);
        buf += 16;
        len -= 16;
    }
    /* 128 bits to 64, then Barrett reduction to 32 */
    x2 = _mm_clmulepi64_si128(x1, x0, 0x10);
    x3 = _mm_setr_epi32(~0, 0, ~0, 0);
    x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), x2);
    x0 = k5k0;
    x2 = _mm_srli_si128(x1, 4);
    x1 = _mm_and_si128(x1, x3);
    x1 = _mm_xor_si128(_mm_clmulepi64_si128(x1, x0, 0x00), x2);
    x0 = poly;
    x2 = _mm_and_si128(x1, x3);
    x2 = _mm_clmulepi64_si128(x2, x0, 0x10);
    x2 = _mm_and_si128(x2, x3);
    x2 = _mm_clmulepi64_si128(x2, x0, 0x00);
    x1 = _mm_xor_si128(x1, x2);
    return (uint32_t)_mm_extract_epi32(x1, 1);
}
#endif

/* 1 when crc32_update folds with carry-less multiplication here (this variant, this CPU), else 0. */
int KFN(crc32_fast)(void) {
#ifdef PARLEY_CRC_FOLD
    __builtin_cpu_init();
    return __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
#else
    return 0;
#endif
}

unsigned KFN(crc32_update)(unsigned crc, const unsigned char *buf, long len) {
    uint32_t c = ~(uint32_t)crc;
    if (len <= 0) return crc;
#ifdef PARLEY_CRC_FOLD
    if (len >= 64 && KFN(crc32_fast)()) {
        long n = len & ~15L;
        c = KFN(crc32_fold)(c, buf, n);
        buf += n;
        len -= n;
    }
#undef PARLEY_CRC_FOLD
#endif
    return ~KFN(crc32_bytes)(c, buf, len);
}
