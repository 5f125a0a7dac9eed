/* The AVX-512 variant (F, BW, DQ, VL) of every kernel, with AVX2 and FMA. GCC on x86-64 only: elsewhere
   the table says "not built" and the dispatcher never picks it. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
#include "system.h"
#pragma GCC visibility push(hidden)
#define KFN(name) name##_avx512
#include "kernels.inc"
#pragma GCC visibility pop
const struct parley_kernels parley_variant_avx512 = PARLEY_TABLE("avx512");
#else
#include "kernels.h"
const struct parley_kernels parley_variant_avx512 = { "avx512", 0 };
#endif
