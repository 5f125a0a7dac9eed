"""Keep freed memory mapped for reuse, so a restore does not pay page faults for its working copy.

Restoring an 8K-token conversation writes a ~380 MB full-precision working copy.
Memory fresh from the kernel costs a page fault per 4 KB page on first touch:
~190 ms for those 380 MB here, against ~25 ms to fill memory the process already
has (2-core AMD EPYC VM). Switching personas frees one working copy and builds
another, so keeping what was freed pays off - two allocators are involved:

* MLX keeps freed buffers for reuse up to its cache limit, but only for a
  request of (nearly) the same size: raised here to the cache budget.
* glibc returns large freed blocks to the kernel (each one above its dynamic
  mmap threshold is its own mapping, and the heap top is trimmed). Here blocks
  under 32 MB (a layer's working copy up to ~40K tokens) come from the heap and
  up to the budget of freed heap stays mapped, so a working copy of any size
  reuses pages the last one faulted in.

Both are bounded by the cache budget the user chose for caches in RAM. Only the
process's first restore, or one larger than everything freed before it, pays
the page faults. On other platforms (macOS, musl) only the MLX part applies.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses more on 64-bit (HEAP_MAX_SIZE / 2)


def reuse_freed_memory(budget_bytes: int) -> None:
    """Let MLX and glibc keep up to `budget_bytes` of freed memory for reuse (never lowers a larger MLX limit)."""
    import mlx.core as mx

    previous = mx.set_cache_limit(budget_bytes)
    if previous > budget_bytes:
        mx.set_cache_limit(previous)
    _glibc_keep_freed(budget_bytes)


def _glibc_keep_freed(budget_bytes: int) -> bool:
    """Set glibc's mmap and trim thresholds (see the module docstring); False where there is no glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
    return libc.mallopt(M_TRIM_THRESHOLD, max(int(budget_bytes), MMAP_THRESHOLD_MAX)) == 1 and ok
