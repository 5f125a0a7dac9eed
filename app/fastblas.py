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
    """Load the best BLAS found into the global scope; return its path. Then start numpy's own BLAS with one
    thread (`numpy_blas_one_thread`)."""
    global loaded
    if loaded is not None or not sys.platform.startswith("linux"):
        return loaded
    path = _preload_system_blas()
    numpy_blas_one_thread()
    return path


def _preload_system_blas() -> str | None:
    global loaded
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


numpy_blas: str | None = None
"""numpy's bundled OpenBLAS when it was started here with one thread (see `numpy_blas_one_thread`)."""


def numpy_blas_one_thread() -> str | None:
    """Start the OpenBLAS bundled in numpy's Linux wheel with one thread, before numpy imports it.

    At load, that OpenBLAS starts a worker thread per core which spins (sched_yield) for ~0.1 s waiting for
    work: ~40 ms of CPU on the 2-core machines at every start, competing with the model load, for a library
    Parley calls only for vector glue (its matmuls go through MLX and the BLAS preloaded above; numpy's one
    LAPACK use, a fixed rotation's QR, gives the same bits on 1 or 2 threads). It reads OPENBLAS_NUM_THREADS
    once, when loaded: so it is loaded here with that set to 1 for the moment (numpy's extension later finds
    it already loaded). Not when the user set OPENBLAS_NUM_THREADS, when numpy is already imported, or
    where the wheel has no bundled OpenBLAS (then nothing changes).
    """
    global numpy_blas
    if numpy_blas is not None or "numpy" in sys.modules or "OPENBLAS_NUM_THREADS" in os.environ:
        return numpy_blas
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("numpy")
    if spec is None or not spec.origin:
        return None
    libs = sorted((Path(spec.origin).parent.parent / "numpy.libs").glob("lib*openblas*.so*"))
    if len(libs) != 1:
        return None
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        ctypes.CDLL(str(libs[0]), mode=ctypes.RTLD_LOCAL)
        numpy_blas = str(libs[0])
    except OSError:
        return None
    finally:
        del os.environ["OPENBLAS_NUM_THREADS"]
    return numpy_blas
