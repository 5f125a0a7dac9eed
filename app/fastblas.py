"""Load an optimized BLAS before MLX on Linux.

The Linux `mlx[cpu]` wheel links a reference BLAS (`libblas.so.3` from
netlib): a 2048x2048 fp32 matmul runs at ~8 GFLOP/s on our 2-core machines.
MLX resolves `cblas_sgemm` through the global symbol scope, so loading
OpenBLAS with RTLD_GLOBAL *before* the first `import mlx` makes every MLX
matmul use it (~240 GFLOP/s, measured with `parley bench --quick`).

Call `preload()` before anything imports `mlx`; `app.cli` and the test
conftest do. On macOS MLX uses Accelerate/Metal and this does nothing.
`PARLEY_BLAS=none` turns it off, `PARLEY_BLAS=/path/lib.so` picks a library.
"""

from __future__ import annotations

import ctypes
import os
import sys

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "libopenblas.so.0",
)

loaded: str | None = None
"""The BLAS library that was preloaded, or None (reported by `parley bench`)."""


def preload() -> str | None:
    """Load the best BLAS found into the global scope; return its path."""
    global loaded
    if loaded is not None or not sys.platform.startswith("linux"):
        return loaded
    choice = os.environ.get("PARLEY_BLAS", "")
    if choice == "none":
        return None
    if "mlx.core" in sys.modules:
        return None  # too late: MLX already bound its BLAS symbols
    for path in ([choice] if choice else []) + list(_CANDIDATES):
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded = path
        return path
    return None
