"""Host-buffer execution for the CPU path: numpy views of evaluated MLX arrays handed to the C kernels.

Each MLX eval costs ~60 us on the 2-core machines (worker-thread hand-off), so the one-token decode step
keeps what it can on host (numpy) buffers: the 4/8-bit gemv (`Q4Weights`), the decode attention over the
KV cache buffers (`attn_decode_host`) and RMSNorm with MLX's exact arithmetic (`rms_host`).
"""

from __future__ import annotations

import mlx.core as mx

from app.model.cpu_kernels import kernels


def rms_host(x, w, eps: float):
    """MLX's CPU rms_norm(x, w, eps) of one fp32 row, bitwise: sequential sum of squares (cumsum)."""
    import numpy as np

    ss = np.cumsum(x * x, dtype=np.float32)[-1]
    r = np.float32(1) / np.sqrt(ss * np.float32(1.0 / x.size) + np.float32(eps))
    return w * (x * r)


class Q4Weights:
    """A quantized layer's 4-bit weights kept (as numpy, outside the parameter tree) for `q4_gemv`."""

    def __init__(self, w, s, b, bits: int):
        self.w, self.s, self.b, self.bits = w, s, b, bits
        self.O, self.K = s.shape[0], w.shape[1] * 8 // bits
        self.ptrs = (w.ctypes.data, s.ctypes.data, b.ctypes.data)
        self.gemv = kernels().q4_gemv if bits == 4 else kernels().q8_gemv

    @classmethod
    def of(cls, m, bits: int | None = None) -> "Q4Weights":
        """Views of `m`'s evaluated weight, scales and biases (copied only where not contiguous or not fp32);
        `m` is a quantized layer or a `q4_stacks.Stack` (whose `bits` are given)."""
        import numpy as np

        return cls(np.ascontiguousarray(np.asarray(m.weight).view(np.uint8)),
                   np.ascontiguousarray(np.asarray(m.scales.astype(mx.float32))),
                   np.ascontiguousarray(np.asarray(m.biases.astype(mx.float32))), m.bits if bits is None else bits)

    @classmethod
    def stacked(cls, parts: list["Q4Weights"]) -> "Q4Weights":
        """One gemv for several layers with the same input (q/k/v, gate/up): outputs concatenated."""
        import numpy as np

        return cls(*(np.ascontiguousarray(np.concatenate([getattr(p, a) for p in parts])) for a in "wsb"), parts[0].bits)

    @staticmethod
    def usable(m) -> bool:
        k = kernels()
        return (k is not None and k.q4_fast() == 1 and getattr(m, "bits", 0) in (4, 8)
                and getattr(m, "group_size", 0) == 32
                and getattr(m, "mode", "affine") == "affine" and "biases" in m)

    def numpy(self, xa):
        """y = W xa for a contiguous fp32 numpy vector of K values."""
        import numpy as np

        y = np.empty(self.O, np.float32)
        self.gemv(*self.ptrs, xa.ctypes.data, y.ctypes.data, self.O, self.K)
        return y

    def __call__(self, x: mx.array) -> mx.array:
        return mx.array(self.numpy(host_vector(x))).reshape(*x.shape[:-1], self.O)


def stack_q4(layers) -> "Q4Weights | None":
    """The layers' 4-bit weights stacked into one gemv, or None when one has none (or a bias) or bits differ.

    One layer is its own weights; layers stacked at load (`app.model.q4_stacks`) are read where they lie; others
    are copied into a stack."""
    q4s = [layer.__dict__.get("_q4") for layer in layers]
    if any(q is None or "bias" in layer for q, layer in zip(q4s, layers)) or len({q.bits for q in q4s}) != 1:
        return None
    if len(q4s) == 1:
        return q4s[0]
    from app.model.q4_stacks import stack_of

    stack = stack_of(layers)
    if stack is not None:
        return Q4Weights.of(stack, bits=q4s[0].bits)
    return Q4Weights.stacked(q4s)


def host_vector(x: mx.array):
    """Evaluate `x` and view it as a contiguous fp32 numpy array (copied only if strided)."""
    import numpy as np

    mx.eval(x)
    return np.ascontiguousarray(np.asarray(memoryview(x)), dtype=np.float32).reshape(-1)


def _attn_strided(x: mx.array):
    """Host view of an evaluated [1, heads, T, D] fp32 array with contiguous rows; returns (array, head stride)."""
    import numpy as np

    a = np.asarray(memoryview(x))
    if a.dtype != np.float32 or a.strides[-1] != 4 or a.strides[-2] != 4 * a.shape[-1] or a.strides[1] % 4:
        a = np.ascontiguousarray(a, dtype=np.float32)
    return a, a.strides[1] // 4


def attn_decode(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(scale q K^T) V for one query position ([1, H, 1, D]) in the C kernel, no BLAS calls."""
    return mx.array(attn_decode_host(q, k, v, scale))


def attend_compact(cache, q: mx.array, k: mx.array, v: mx.array, scale: float):
    """The one-token step over a compact cache (sealed blocks kept only encoded, app.kvstore.live_cache):
    append k/v and attend in C over the encoded blocks plus the tail; host (numpy, H * D floats) output.
    None when the cache is not compact (or stops being so): the caller updates and attends as usual."""
    attend_one = getattr(cache, "attend_one", None) if getattr(cache, "compact", False) else None
    return attend_one(q, k, v, scale) if attend_one is not None else None


def attend_rows_compact(cache, q: mx.array, k: mx.array, v: mx.array, scale: float):
    """A short causal prefill chunk over a compact cache: append k/v and attend in C over the encoded blocks plus
    the tail; host (numpy, (L, H * D)) output. None when the cache is not compact (or the kernel cannot read it):
    nothing was appended, the caller updates and attends as usual."""
    attend_rows = getattr(cache, "attend_rows", None) if getattr(cache, "compact", False) else None
    return attend_rows(q, k, v, scale) if attend_rows is not None else None


def attn_decode_host(q: mx.array, k: mx.array, v: mx.array, scale: float):
    """`attn_decode` into a host (numpy, H * D floats) buffer."""
    import numpy as np

    mx.eval(q, k, v)
    qa = np.ascontiguousarray(np.asarray(memoryview(q)), dtype=np.float32)
    ka, k_hs = _attn_strided(k)
    va, v_hs = _attn_strided(v)
    _, H, _, D = qa.shape
    Hkv, T = ka.shape[1], ka.shape[2]
    out = np.empty(H * D, np.float32)
    scratch = np.empty(T, np.float32)
    kernels().attn_decode(qa.ctypes.data, ka.ctypes.data, va.ctypes.data, out.ctypes.data, scratch.ctypes.data,
                          H, Hkv, T, D, k_hs, v_hs, float(scale))
    return out
