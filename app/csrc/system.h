/* The system headers the kernels use, included by a variant_*.c before it hides its kernels' names
   (declarations made under `#pragma GCC visibility push(hidden)` would hide libm's and libc's too), and the
   thread pool's functions (threads.h: one copy, in threads.c, shared by the variants). */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include "threads.h"
