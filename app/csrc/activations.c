/* The MLP's activation: MLX's CPU backend evaluates exp one scalar at a time; this loop vectorises it. */
#include <math.h>

/* g[i] = silu(g[i]) * u[i], in place over g. expf's argument is capped at 80: beyond ~88 it overflows
   to inf, which the fast-math vector expf does not handle (NaN for gates below -88); silu(x) there is
   x * e^x ~ 0 either way. */
void silu_mul(float *g, const float *u, long n) {
    #pragma omp simd
    for (long i = 0; i < n; i++) { float x = g[i]; g[i] = x / (1.f + expf(fminf(-x, 80.f))) * u[i]; }
}
