/* The AVX2 + FMA variant of every kernel. GCC on x86-64 only: elsewhere the table says "not built". */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma")
#include "system.h"
#pragma GCC visibility push(hidden)
#define KFN(name) name##_avx2
#include "kernels.inc"
#pragma GCC visibility pop
const struct parley_kernels parley_variant_avx2 = PARLEY_TABLE("avx2");
#else
#include "kernels.h"
const struct parley_kernels parley_variant_avx2 = { "avx2", 0 };
#endif
