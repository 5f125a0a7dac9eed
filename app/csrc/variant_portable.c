/* The portable variant of every kernel: the compiler's baseline target (SSE2 on x86-64, NEON on arm64),
   the scalar bodies of the hand-written kernels. Runs on any CPU. */
#include "system.h"
#pragma GCC visibility push(hidden)
#define KFN(name) name##_portable
#include "kernels.inc"
#pragma GCC visibility pop
const struct parley_kernels parley_variant_portable = PARLEY_TABLE("portable");
