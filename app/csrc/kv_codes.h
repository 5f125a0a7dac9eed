/* 4-bit and 8-bit KV codes as floats, 8 at a time (AVX2): shared by the block decoder (kv_decode.c) and the
   attention over encoded blocks (q4_attention.c), so both read a stored block the same way. */
#ifndef PARLEY_KV_CODES_H
#define PARLEY_KV_CODES_H
#ifdef __AVX2__
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
/* 8 consecutive 4-bit codes (4 bytes, even channel in the low nibble) as floats. */
static inline __m256 codes4x8(const uint8_t *p) {
    uint32_t x;
    memcpy(&x, p, 4);
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    __m256i v = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)x), shifts), _mm256_set1_epi32(15));
    return _mm256_cvtepi32_ps(v);
}
/* 8 consecutive 8-bit codes as floats. */
static inline __m256 codes8x8(const uint8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
#endif
#endif
