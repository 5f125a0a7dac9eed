"""The C kernels of the CPU path (sources in app/csrc), loaded once, with their ctypes signatures.

One library holds every kernel: softmax and decode attention (attention.c), SiLU*up (activations.c),
the 4/8-bit gemv and its row-batched twin (qgemv.c), the KV block decoder (kv_decode.c) and the decode
attention over encoded KV blocks (q4_attention.c).
`kernels()` is None without a C compiler or with `PARLEY_CPU_KERNELS=0`; callers then stay on plain MLX.
`data_pointer` and `fresh` hand MLX buffers to the kernels.
"""

from __future__ import annotations

import ctypes

import mlx.core as mx

from app.model import ckernels

SOURCES = ("attention.c", "activations.c", "qgemv.c", "kv_decode.c", "q4_attention.c")
_kernels: ctypes.CDLL | None | bool = False  # False: not tried yet


def kernels() -> ctypes.CDLL | None:
    """The compiled C kernels (see app.model.ckernels), or None if unavailable."""
    global _kernels
    if _kernels is not False:
        return _kernels
    _kernels = None
    k = ckernels.build("parley_kernels", [ckernels.CSRC / name for name in SOURCES])
    if k is not None:
        _declare(k)
        _kernels = k
    return _kernels


def reset() -> None:
    """Forget the loaded library, so the next `kernels()` looks again (tests that switch kernels off)."""
    global _kernels
    _kernels = False


def _declare(k: ctypes.CDLL) -> None:
    L, P = ctypes.c_long, ctypes.c_void_p
    signatures = {
        "causal_softmax": [P, L, L, L, L, ctypes.c_int],
        "silu_mul": [P, P, L],
        "q4_gemv": [P, P, P, P, P, L, L],
        "q8_gemv": [P, P, P, P, P, L, L],
        "q4_rows": [P, P, P, P, P, L, L, L],
        "q8_rows": [P, P, P, P, P, L, L, L],
        "attn_decode": [P, P, P, P, P, L, L, L, L, L, L, ctypes.c_float],
        "kv_decode_jobs": [P, L, P, L],
        "kvq_attn_decode": [P, P, P, P, L, L, L, L, ctypes.c_float, P, P, L, P, P, P, L, L, L, L],
    }
    for name, args in signatures.items():
        fn = getattr(k, name)
        fn.argtypes, fn.restype = args, None
    k.q4_fast.restype = ctypes.c_int
    k.kvq_has_avx2.restype = ctypes.c_int
    k.q4_rows_fast.restype = ctypes.c_int


def data_pointer(a: mx.array) -> int:
    """Address of an evaluated, row-contiguous fp32 MLX array's data (shared, not copied), for a kernel that
    writes into it. Raises ValueError for anything else (a C write through a wrong layout corrupts memory)."""
    import numpy as np

    view = np.asarray(memoryview(a))
    if not view.flags.c_contiguous or view.dtype != np.float32:
        raise ValueError(f"C kernel buffer must be contiguous float32, got {view.dtype} with strides {view.strides}")
    return view.ctypes.data


def fresh(a: mx.array) -> mx.array:
    """Evaluate `a` into its own contiguous buffer that the kernels may overwrite."""
    import numpy as np

    mx.eval(a)
    if not np.asarray(memoryview(a)).flags.c_contiguous:
        a = mx.contiguous(a)
        mx.eval(a)
    return a
