"""Make a model fast on MLX's CPU backend (Linux x86/ARM without Metal).

Measured on the 2-core x86 machines (OpenBLAS preloaded, see `app.fastblas`),
SmolLM2-135M, `parley bench --quick`:

* MLX's CPU quantized matmul is compute-bound scalar code: 4-bit weights
  prefill ~11 tokens/s. Dequantized to fp32 they go through BLAS sgemm
  (~230 GFLOP/s) -> ~240 tokens/s. fp16/bf16 have no BLAS path (10x slower)
  and 4/8-bit `quantized_matmul` gemv is 2x slower than fp32 gemv even at
  M=1, so among MLX's own kernels fp32 is the fastest for prefill and decode.
* With fp32 matmuls, ~75% of prefill time went to `exp`: MLX's CPU backend
  evaluates exp/sigmoid one scalar at a time (~28 ns each here, also inside
  `mx.compile`d kernels), i.e. the softmax of SDPA and the SiLU of the MLP.
  `speed_up_for_cpu` therefore swaps the llama-style attention and MLP for
  versions that keep the matmuls in MLX/BLAS and run softmax and SiLU*up in a
  small C kernel (vectorized `expf`; no OpenMP: its spinning threads fought
  OpenBLAS on 2 cores), compiled once with the system C
  compiler and cached (`kernels()`); without a compiler they stay pure MLX.
  The kernels work in place on freshly evaluated MLX buffers, so these paths
  evaluate at each attention/MLP (fine on CPU: no GPU queue to keep full).
* Decode (one token) is memory-bound: fp32 gemv streams 540 MB a token
  (~14-18 GB/s here). Decode steps instead use the original 4-bit (layers)
  and 8-bit (tied embedding/head) weights, kept outside the parameter tree,
  through AVX-512 gemv kernels that read 4-8x fewer bytes (q/k/v and
  gate/up fused into one call each; SiLU*up and the down projection stay on
  the host buffer), and the decode attention runs in C over the KV cache
  buffers (no tiny BLAS calls, whose thread wake-ups cost more than the math).
  Each MLX eval costs ~60 us here (worker-thread hand-off), so a llama block's
  decode step (`_CpuBlock`) keeps the residual stream on the host: RMSNorm in
  numpy with MLX's exact arithmetic and o_proj straight from the attention
  buffer leave one eval a layer (rope + the cache's own update), with logits and
  cache contents bitwise those of the per-module path (~42 -> ~54 tokens/s).
  The quantized kernels compute exactly q*scale+bias in fp32, so decode logits
  match MLX's 4-bit reference to ~1e-5; prefill uses the same weights
  dequantized exactly to fp32 (fp32 scales: no fp16 rounding).
* Modules are not wrapped: their classes get a CPU mixin (`_retype`), so
  parameter names and attributes stay those of mlx-lm.

Without a C compiler everything stays pure MLX (fp32 weights); without
AVX-512 the quantized decode kernels are off (fp32 gemv instead).
Apple silicon never calls this: on Metal the quantized kernels are fast.
`PARLEY_CPU_KERNELS=0` turns the C kernels off.
"""

from __future__ import annotations

import ctypes

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from app.model import ckernels

_C_SOURCE = r"""
#include <math.h>
#include <stddef.h>
#include <float.h>

/* Row-wise softmax in place over s[rows][T] (scores already scaled). Row r is
   query (r % L), at absolute position offset + r % L; with causal set, keys
   after it get probability 0. */
void causal_softmax(float *s, long rows, long L, long T, long offset, int causal) {
    #pragma omp parallel for schedule(static)
    for (long r = 0; r < rows; r++) {
        float *row = s + r * T;
        long n = causal ? offset + (r % L) + 1 : T;
        if (n > T) n = T;
        float m = -FLT_MAX;
        for (long j = 0; j < n; j++) m = row[j] > m ? row[j] : m;
        float sum = 0.f;
        #pragma omp simd reduction(+:sum)
        for (long j = 0; j < n; j++) { float e = expf(row[j] - m); row[j] = e; sum += e; }
        float inv = 1.f / sum;
        #pragma omp simd
        for (long j = 0; j < n; j++) row[j] *= inv;
        for (long j = n; j < T; j++) row[j] = 0.f;
    }
}

/* y[O] = W x for one row x[K], W in MLX's 4-bit layout (group 32, two weights a byte, low nibble
   first): w = q * scale + bias per group. Reads 8x fewer bytes than fp32 gemv (decode is
   memory-bound). AVX-512 path; q4_fast() says whether it was compiled in. */
#ifdef __AVX512F__
#include <immintrin.h>
#endif
int q4_fast(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

void q4_gemv(const unsigned char *w, const float *s, const float *b, const float *x, float *y, long O, long K) {
    long G = K / 32;
    float xe[K / 2], xo[K / 2], xs[G];
    for (long g = 0; g < G; g++) {
        float t = 0.f;
        for (int j = 0; j < 16; j++) {
            xe[g * 16 + j] = x[g * 32 + 2 * j];
            xo[g * 16 + j] = x[g * 32 + 2 * j + 1];
            t += x[g * 32 + 2 * j] + x[g * 32 + 2 * j + 1];
        }
        xs[g] = t;
    }
    for (long o = 0; o < O; o++) {
        const unsigned char *p = w + o * (K / 2);
        const float *so = s + o * G, *bo = b + o * G;
        float bias = 0.f;
        for (long g = 0; g < G; g++) bias += bo[g] * xs[g];
#ifdef __AVX512F__
        __m512 acc = _mm512_setzero_ps();
        const __m512i m15 = _mm512_set1_epi32(15);
        for (long g = 0; g < G; g++) {
            __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + g * 16)));
            __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, m15));
            __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
            __m512 d = _mm512_mul_ps(_mm512_loadu_ps(xe + g * 16), lo);
            d = _mm512_fmadd_ps(_mm512_loadu_ps(xo + g * 16), hi, d);
            acc = _mm512_fmadd_ps(_mm512_set1_ps(so[g]), d, acc);
        }
        y[o] = _mm512_reduce_add_ps(acc) + bias;
#else
        float acc = 0.f;
        for (long g = 0; g < G; g++) {
            float d = 0.f;
            const unsigned char *pg = p + g * 16;
            for (int j = 0; j < 16; j++) d += xe[g * 16 + j] * (float)(pg[j] & 15) + xo[g * 16 + j] * (float)(pg[j] >> 4);
            acc += so[g] * d;
        }
        y[o] = acc + bias;
#endif
    }
}

/* The same for MLX's 8-bit layout (group 32, one weight a byte). */
void q8_gemv(const unsigned char *w, const float *s, const float *b, const float *x, float *y, long O, long K) {
    long G = K / 32;
    float xs[G];
    for (long g = 0; g < G; g++) {
        float t = 0.f;
        for (int j = 0; j < 32; j++) t += x[g * 32 + j];
        xs[g] = t;
    }
    for (long o = 0; o < O; o++) {
        const unsigned char *p = w + o * K;
        const float *so = s + o * G, *bo = b + o * G;
        float bias = 0.f;
        for (long g = 0; g < G; g++) bias += bo[g] * xs[g];
#ifdef __AVX512F__
        __m512 acc = _mm512_setzero_ps();
        for (long g = 0; g < G; g++) {
            __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + g * 32))));
            __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + g * 32 + 16))));
            __m512 d = _mm512_mul_ps(_mm512_loadu_ps(x + g * 32), a);
            d = _mm512_fmadd_ps(_mm512_loadu_ps(x + g * 32 + 16), c, d);
            acc = _mm512_fmadd_ps(_mm512_set1_ps(so[g]), d, acc);
        }
        y[o] = _mm512_reduce_add_ps(acc) + bias;
#else
        float acc = 0.f;
        for (long g = 0; g < G; g++) {
            float d = 0.f;
            for (int j = 0; j < 32; j++) d += x[g * 32 + j] * (float)p[g * 32 + j];
            acc += so[g] * d;
        }
        y[o] = acc + bias;
#endif
    }
}

/* One query row per head against a KV cache (decode step): out[h][D] = softmax(scale q_h K^T) V
   for the kv head h / (H / Hkv). Rows of K/V are contiguous (D floats); heads are k_hs/v_hs
   floats apart (the cache buffer may be longer than T). */
void attn_decode(const float *q, const float *k, const float *v, float *out, float *s,
                 long H, long Hkv, long T, long D, long k_hs, long v_hs, float scale) {
    long G = H / Hkv;
    for (long h = 0; h < H; h++) {
        const float *qh = q + h * D, *kh = k + (h / G) * k_hs, *vh = v + (h / G) * v_hs;
        float m = -FLT_MAX;
        for (long t = 0; t < T; t++) {
            float d = 0.f;
            #pragma omp simd reduction(+:d)
            for (long i = 0; i < D; i++) d += qh[i] * kh[t * D + i];
            d *= scale;
            s[t] = d;
            m = d > m ? d : m;
        }
        float sum = 0.f;
        #pragma omp simd reduction(+:sum)
        for (long t = 0; t < T; t++) { float e = expf(s[t] - m); s[t] = e; sum += e; }
        float *oh = out + h * D;
        for (long i = 0; i < D; i++) oh[i] = 0.f;
        for (long t = 0; t < T; t++) {
            float p = s[t] / sum;
            #pragma omp simd
            for (long i = 0; i < D; i++) oh[i] += p * vh[t * D + i];
        }
    }
}

/* g[i] = silu(g[i]) * u[i], in place over g. expf's argument is capped at 80: beyond ~88 it overflows
   to inf, which the fast-math vector expf does not handle (NaN for gates below -88); silu(x) there is
   x * e^x ~ 0 either way. */
void silu_mul(float *g, const float *u, long n) {
    #pragma omp simd
    for (long i = 0; i < n; i++) { float x = g[i]; g[i] = x / (1.f + expf(fminf(-x, 80.f))) * u[i]; }
}
"""
_kernels: ctypes.CDLL | None | bool = False  # False: not tried yet


def kernels() -> ctypes.CDLL | None:
    """The compiled C kernels (see app.model.ckernels), or None if unavailable."""
    global _kernels
    if _kernels is not False:
        return _kernels
    _kernels = None
    k = ckernels.build("cpu_kernels", _C_SOURCE)
    if k is not None:
        L, P = ctypes.c_long, ctypes.c_void_p
        k.causal_softmax.argtypes = [P, L, L, L, L, ctypes.c_int]
        k.causal_softmax.restype = None
        k.silu_mul.argtypes = [P, P, L]
        k.silu_mul.restype = None
        k.q4_gemv.argtypes = [P, P, P, P, P, L, L]
        k.q4_gemv.restype = None
        k.q8_gemv.argtypes = [P, P, P, P, P, L, L]
        k.q8_gemv.restype = None
        k.attn_decode.argtypes = [P, P, P, P, P, L, L, L, L, L, L, ctypes.c_float]
        k.attn_decode.restype = None
        k.q4_fast.restype = ctypes.c_int
        _kernels = k
    return _kernels


def _ptr(a: mx.array) -> int:
    """Address of an evaluated, row-contiguous fp32 MLX array's data (shared, not copied)."""
    import numpy as np

    view = np.asarray(memoryview(a))
    assert view.flags.c_contiguous and view.dtype == np.float32
    return view.ctypes.data


def _fresh(a: mx.array) -> mx.array:
    """Evaluate `a` into its own contiguous buffer that the kernels may overwrite."""
    import numpy as np

    mx.eval(a)
    if not np.asarray(memoryview(a)).flags.c_contiguous:
        a = mx.contiguous(a)
        mx.eval(a)
    return a


class _CpuAttention:
    """llama-style attention for the CPU: BLAS matmuls for QK^T and PV, softmax in the C kernel.

    Mixed into the model's own attention class by `_retype` (projections and rope used as they are).
    Falls back to the original __call__ for masks other than None/"causal" and for caches that
    do not hand back plain fp32 keys/values (e.g. mlx-lm's QuantizedKVCache).
    """

    def _cpu_prepare(self) -> None:
        object.__setattr__(self, "_qkv", _stack_q4([self.q_proj, self.k_proj, self.v_proj]))

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        a = self
        if (mask is not None and not (isinstance(mask, str) and mask == "causal")) or hasattr(cache, "bits"):
            return super().__call__(x, mask, cache)
        B, L, _ = x.shape
        H, Hkv = a.n_heads, a.n_kv_heads
        G = H // Hkv
        qkv = self.__dict__.get("_qkv")
        if qkv is not None and B * L == 1:  # decode step: one 4-bit gemv for q, k and v
            y = qkv(x)
            nq, nk = a.q_proj.weight.shape[0], a.k_proj.weight.shape[0]
            q, k, v = y[..., :nq], y[..., nq:nq + nk], y[..., nq + nk:]
        else:
            q, k, v = a.q_proj(x), a.k_proj(x), a.v_proj(x)
        q, k = self._qk_heads(q, k, B, L)
        v = v.reshape(B, L, Hkv, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q = a.rope(q, offset=offset)
        k = a.rope(k, offset=offset)
        out = _attend_compact(cache, q, k, v, a.scale) if B * L == 1 else None
        if cache is not None and out is None:
            k, v = cache.update_and_fetch(k, v)
        if out is None and k.dtype != mx.float32:
            return super().__call__(x, mask, cache) if cache is None else self._mlx_tail(q, k, v, mask, B, L)
        D = q.shape[-1]
        if B * L == 1:
            out = _attn_decode_host(q, k, v, a.scale) if out is None else out
            o = self._o_q4()
            if o is not None:  # o_proj straight from the host buffer: an MLX array built from numpy needs no eval
                return mx.array(o.numpy(out).reshape(1, 1, o.O))
            return a.o_proj(mx.array(out).reshape(1, 1, H * D))
        T = k.shape[2]
        # GQA without repeating K/V: the G query heads of a KV head become G*L rows.
        qg = (q * a.scale).reshape(B, Hkv, G * L, D)
        scores = _fresh(qg @ k.swapaxes(-1, -2))  # [B, Hkv, G*L, T]
        kernels().causal_softmax(_ptr(scores), B * Hkv * G * L, L, T, T - L, int(mask is not None and L > 1))
        out = (scores @ v).reshape(B, H, L, D)
        return a.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def _qk_heads(self, q, k, B: int, L: int):
        """Queries and keys split into heads, [B, heads, L, D], through the model's q/k norms where it has them
        (qwen3, gemma3: RMSNorm over each head's vector, as the model's own __call__ applies them)."""
        q = q.reshape(B, L, self.n_heads, -1)
        k = k.reshape(B, L, self.n_kv_heads, -1)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        return q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)

    def _o_q4(self) -> "_Q4 | None":
        # the attention output is n_heads * (q_proj rows / n_heads) wide; not every model names head_dim (qwen2/3)
        o = self.o_proj.__dict__.get("_q4")
        return o if o is not None and "bias" not in self.o_proj and o.K == self.q_proj.weight.shape[0] else None

    def _decode_host(self, xa, cache):
        """The one-token step of __call__ from a host (numpy) input row to o_proj's host output, or None.

        The same operations as __call__'s decode path (q/k/v gemv, MLX rope, the cache's own
        update_and_fetch, C attention, o_proj gemv): same values, same cache contents.
        """
        a = self
        qkv, o = self.__dict__.get("_qkv"), self._o_q4()
        if qkv is None or o is None or cache is None or hasattr(cache, "bits") or qkv.K != xa.size:
            return None
        Hkv = a.n_kv_heads
        y = mx.array(qkv.numpy(xa)).reshape(1, 1, qkv.O)
        nq, nk = a.q_proj.weight.shape[0], a.k_proj.weight.shape[0]
        q, k, v = y[..., :nq], y[..., nq:nq + nk], y[..., nq + nk:]
        q, k = self._qk_heads(q, k, 1, 1)
        v = v.reshape(1, 1, Hkv, -1).transpose(0, 2, 1, 3)
        offset = cache.offset
        q = a.rope(q, offset=offset)
        k = a.rope(k, offset=offset)
        out = _attend_compact(cache, q, k, v, a.scale)
        if out is not None:
            return o.numpy(out)
        k, v = cache.update_and_fetch(k, v)
        if k.dtype != mx.float32:  # as __call__ does
            return _host(self._mlx_tail(q, k, v, None, 1, 1))
        return o.numpy(_attn_decode_host(q, k, v, a.scale))

    def _mlx_tail(self, q, k, v, mask, B, L):
        from mlx_lm.models.base import scaled_dot_product_attention

        a = self
        out = scaled_dot_product_attention(q, k, v, cache=None, scale=a.scale, mask=mask)
        return a.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class _CpuMLP:
    """SwiGLU MLP with silu(gate)*up in the C kernel (prefill only; one-token steps stay in MLX)."""

    def _cpu_prepare(self) -> None:
        object.__setattr__(self, "_gate_up", _stack_q4([self.gate_proj, self.up_proj]))
        object.__setattr__(self, "_down", _stack_q4([self.down_proj]))

    def __call__(self, x: mx.array) -> mx.array:
        m = self
        gate_up, down = self.__dict__.get("_gate_up"), self.__dict__.get("_down")
        if x.size == x.shape[-1] and gate_up is not None and down is not None:
            # decode step: gate/up gemv, SiLU*up and down gemv all on the host buffers
            y = gate_up.numpy(_host(x))
            n = y.shape[0] // 2
            kernels().silu_mul(y.ctypes.data, y[n:].ctypes.data, n)
            return mx.array(down.numpy(y[:n])).reshape(x.shape)
        if x.shape[-2] == 1:
            return super().__call__(x)
        g = _fresh(m.gate_proj(x))
        u = _fresh(m.up_proj(x))
        kernels().silu_mul(_ptr(g), _ptr(u), g.size)
        return m.down_proj(g)


class _CpuBlock:
    """llama TransformerBlock whose one-token step runs on host (numpy) buffers between the C kernels.

    RMSNorm and the residual adds are computed on the host with MLX's exact arithmetic (sequential
    fp32 sum of squares, times 1/N, + eps, 1/sqrt, x * r * w): bitwise MLX's CPU `rms_norm`
    (tests/test_cpu_fast.py), so a layer needs one MLX eval (rope + cache update) instead of
    four. Anything else goes to the original __call__.
    """

    def _cpu_prepare(self) -> None:
        import numpy as np

        norms = (self.input_layernorm, self.post_attention_layernorm)
        host = None
        if all(type(n) is nn.RMSNorm for n in norms):
            host = tuple((np.ascontiguousarray(np.asarray(n.weight.astype(mx.float32))), float(n.eps)) for n in norms)
        object.__setattr__(self, "_host_norms", host)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        norms = self.__dict__.get("_host_norms")
        attn, mlp = self.self_attn, self.mlp
        if (norms is None or x.size != x.shape[-1] or x.dtype != mx.float32 or cache is None or hasattr(cache, "bits")
                or not isinstance(attn, _CpuAttention) or not isinstance(mlp, _CpuMLP)
                or (mask is not None and not (isinstance(mask, str) and mask == "causal"))
                or norms[0][0].size != x.size):
            return super().__call__(x, mask, cache)
        gate_up, down = mlp.__dict__.get("_gate_up"), mlp.__dict__.get("_down")
        if gate_up is None or down is None or attn.__dict__.get("_qkv") is None or attn._o_q4() is None:
            return super().__call__(x, mask, cache)
        xa = _host(x)
        if attn.__dict__["_qkv"].K != xa.size:
            return super().__call__(x, mask, cache)
        r = attn._decode_host(_rms_host(xa, *norms[0]), cache)
        h = xa + r
        y = gate_up.numpy(_rms_host(h, *norms[1]))
        n = y.shape[0] // 2
        kernels().silu_mul(y.ctypes.data, y[n:].ctypes.data, n)
        return mx.array((h + down.numpy(y[:n])).reshape(x.shape))


def _rms_host(x, w, eps: float):
    """MLX's CPU rms_norm(x, w, eps) of one fp32 row, bitwise: sequential sum of squares (cumsum)."""
    import numpy as np

    ss = np.cumsum(x * x, dtype=np.float32)[-1]
    r = np.float32(1) / np.sqrt(ss * np.float32(1.0 / x.size) + np.float32(eps))
    return w * (x * r)


class _Q4:
    """A quantized layer's 4-bit weights kept (as numpy, outside the parameter tree) for `q4_gemv`."""

    def __init__(self, w, s, b, bits: int):
        self.w, self.s, self.b, self.bits = w, s, b, bits
        self.O, self.K = s.shape[0], w.shape[1] * 8 // bits
        self.ptrs = (w.ctypes.data, s.ctypes.data, b.ctypes.data)
        self.gemv = kernels().q4_gemv if bits == 4 else kernels().q8_gemv

    @classmethod
    def of(cls, m) -> "_Q4":
        import numpy as np

        return cls(np.ascontiguousarray(np.asarray(m.weight).view(np.uint8)),
                   np.ascontiguousarray(np.asarray(m.scales.astype(mx.float32))),
                   np.ascontiguousarray(np.asarray(m.biases.astype(mx.float32))), m.bits)

    @classmethod
    def stacked(cls, parts: list["_Q4"]) -> "_Q4":
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
        return mx.array(self.numpy(_host(x))).reshape(*x.shape[:-1], self.O)


def _host(x: mx.array):
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


def _attn_decode(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(scale q K^T) V for one query position ([1, H, 1, D]) in the C kernel, no BLAS calls."""
    return mx.array(_attn_decode_host(q, k, v, scale))


def _attend_compact(cache, q: mx.array, k: mx.array, v: mx.array, scale: float):
    """The one-token step over a compact cache (sealed blocks kept only encoded, app.kvstore.live_cache):
    append k/v and attend in C over the encoded blocks plus the tail; host (numpy, H * D floats) output.
    None when the cache is not compact (or stops being so): the caller updates and attends as usual."""
    attend_one = getattr(cache, "attend_one", None) if getattr(cache, "compact", False) else None
    return attend_one(q, k, v, scale) if attend_one is not None else None


def _attn_decode_host(q: mx.array, k: mx.array, v: mx.array, scale: float):
    """`_attn_decode` into a host (numpy, H * D floats) buffer."""
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


def _stack_q4(layers) -> "_Q4 | None":
    q4s = [layer.__dict__.get("_q4") for layer in layers]
    if any(q is None or "bias" in layer for q, layer in zip(q4s, layers)) or len({q.bits for q in q4s}) != 1:
        return None
    return _Q4.stacked(q4s)


class _CpuLinear(nn.Linear):
    """fp32 Linear (BLAS) that, for a single input row, uses the 4-bit weights with `q4_gemv` instead."""

    def __call__(self, x: mx.array) -> mx.array:
        q4 = self.__dict__.get("_q4")
        if q4 is not None and x.size == q4.K:
            y = q4(x)
            return y + self.bias if "bias" in self else y
        return super().__call__(x)


class _CpuEmbedding(nn.Embedding):
    """fp32 Embedding whose tied head (`as_linear`) uses `q4_gemv` for a single row."""

    def as_linear(self, x: mx.array) -> mx.array:
        q4 = self.__dict__.get("_q4")
        if q4 is not None and x.size == q4.K:
            return q4(x)
        return super().as_linear(x)


def _dequantized(m) -> mx.array:
    # fp32 scales/biases: dequantizing in fp16 would round every weight to fp16 (~0.2% off in the logits).
    f32 = lambda a: a.astype(mx.float32)  # noqa: E731
    return mx.dequantize(m.weight, f32(m.scales), f32(m.biases), m.group_size, m.bits).astype(mx.float32)


def _is_llama_attention(m) -> bool:
    """Attention whose math is `_CpuAttention`'s: q/k/v projections (biases allowed), optional q/k RMSNorm per
    head, the module's own rope, softmax(scale q k^T) v with a causal mask, o_proj. Named classes only: a class
    that merely has the same attributes may add softcaps, other norms or scales (gemma2, deepseek_v2)."""
    return type(m) in _attention_classes()


def _attention_classes() -> tuple:
    from mlx_lm.models import gemma3_text, llama, qwen2, qwen3

    return llama.Attention, qwen2.Attention, qwen3.Attention, gemma3_text.Attention


def _is_llama_block(m) -> bool:
    from mlx_lm.models import llama

    return type(m) is llama.TransformerBlock


def _is_swiglu_mlp(m) -> bool:
    """down(silu(gate(x)) * up(x)) with separate gate/up projections (`_CpuMLP`'s math)."""
    from mlx_lm.models import llama, qwen2, qwen3

    return type(m) in (llama.MLP, qwen2.MLP, qwen3.MLP)


def speed_up_for_cpu(model: nn.Module) -> None:
    """Rewrite `model` in place for MLX's CPU backend.

    Quantized layers become fp32 ones (all weights fp32); on llama-family models whose
    attention/MLP match mlx-lm's llama modules, attention and MLP get the
    C-kernel versions above when the kernels compile. Outputs stay equal to the original
    within fp32 rounding (tests/test_cpu_fast.py).
    """
    if lean_on_cpu(model):
        _keep_quantized(model)
        return
    replacements = []
    for name, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            w = _dequantized(module)
            linear = _CpuLinear(w.shape[1], w.shape[0], bias="bias" in module)
            linear.weight = w
            if _Q4.usable(module):
                object.__setattr__(linear, "_q4", _Q4.of(module))
            if "bias" in module:
                linear.bias = module.bias.astype(mx.float32)
            replacements.append((name, linear))
        elif isinstance(module, nn.QuantizedEmbedding):
            w = _dequantized(module)
            embedding = _CpuEmbedding(w.shape[0], w.shape[1])
            embedding.weight = w
            if _Q4.usable(module):
                object.__setattr__(embedding, "_q4", _Q4.of(module))
            replacements.append((name, embedding))
    if replacements:
        model.update_modules(tree_unflatten(replacements))
    model.apply(lambda x: x.astype(mx.float32) if x.dtype in (mx.float16, mx.bfloat16) else x)
    mx.eval(model.parameters())
    _use_kernels(model, blocks=True)


LEAN_MB_DEFAULT = 1024


def lean_on_cpu(model: nn.Module) -> bool:
    """Keep this model's weights quantized in RAM? Yes when their fp32 copies would pass `PARLEY_LEAN_MB`
    (default 1024 MB): a 3B model's fp32 copy is ~13 GB, an 8B one's does not fit 16-24 GB machines. Smaller
    models (the embedded one: 540 MB) keep the fp32 copies, whose decode through BLAS gemv is ~2x faster."""
    import os

    limit = float(os.environ.get("PARLEY_LEAN_MB", LEAN_MB_DEFAULT))
    fp32 = sum(m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits * 4 for _, m in model.named_modules()
               if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)))
    return fp32 > limit * 2**20


def _keep_quantized(model: nn.Module) -> None:
    """The lean CPU rewrite: quantized layers stay quantized (`_LeanLinear`), fp16/bf16 values become fp32
    (scales and biases included, so dequantizing is exact in fp32), the C kernels for softmax/SiLU apply."""
    model.apply(lambda x: x.astype(mx.float32) if x.dtype in (mx.float16, mx.bfloat16) else x)
    mx.eval(model.parameters())
    for _, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear) and not isinstance(module, _LeanLinear):
            _retype(module, _LeanLinear)
    _use_kernels(model, blocks=False)


def _use_kernels(model: nn.Module, blocks: bool) -> None:
    """Give attention and MLP modules whose math is llama's the C-kernel classes (and, with `blocks`, whole
    blocks the host-side one-token step); nothing when the kernels could not be built."""
    if kernels() is None:
        return
    for layer in getattr(getattr(model, "model", model), "layers", []):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is not None and _is_llama_attention(attn) and not isinstance(attn, _CpuAttention):
            _retype(attn, _CpuAttention)
        if mlp is not None and _is_swiglu_mlp(mlp) and not isinstance(mlp, _CpuMLP):
            _retype(mlp, _CpuMLP)
        if blocks and _is_llama_block(layer) and not isinstance(layer, _CpuBlock):
            _retype(layer, _CpuBlock)


class _LeanLinear:
    """A quantized Linear that stays 4-bit in RAM on the CPU path.

    Several rows (prefill): the weight is dequantized to fp32 for this call only and multiplied through BLAS
    sgemm (the same values as the fp32 copy the non-lean path keeps; MLX frees it after the matmul and
    reuses the buffer for the next layer's). One row (decode): MLX's quantized matmul reads the 4-bit weight.
    """

    def _cpu_prepare(self) -> None:
        pass

    def __call__(self, x: mx.array) -> mx.array:
        if x.size == x.shape[-1]:
            return super().__call__(x)
        w = mx.dequantize(self.weight, self.scales, self.get("biases"), self.group_size, self.bits,
                          mode=getattr(self, "mode", "affine"))
        y = x @ w.T
        return y + self.bias if "bias" in self else y


_retyped: dict = {}


def _retype(module: nn.Module, mixin: type) -> None:
    """Give `module` a subclass of its own class with `mixin`'s __call__ in front.

    The module keeps its attributes and parameter names (nothing is wrapped), so weights,
    `named_modules()` and code that reads e.g. `layer.self_attn.n_kv_heads` see no difference.
    """
    cls = type(module)
    key = (cls, mixin)
    if key not in _retyped:
        _retyped[key] = type(f"Cpu{cls.__name__}", (mixin, cls), {})
    module.__class__ = _retyped[key]
    module._cpu_prepare()


def text_body(model: nn.Module) -> nn.Module | None:
    """The module that maps token ids to final hidden states (`model.model`; for wrappers such as
    mlx-community's gemma3, the text model's), or None if the model has none."""
    lm = getattr(model, "language_model", None)
    if lm is not None and getattr(model, "model", None) is None:
        model = lm
    return getattr(model, "model", None)


def _plain_head_models() -> tuple:
    """Model classes whose __call__ is exactly head(model.model(x)): lm_head or tied embeddings, nothing after."""
    from mlx_lm.models import gemma3_text, llama, qwen2, qwen3

    return llama.Model, qwen2.Model, qwen3.Model, gemma3_text.Model


def prefill_logits(model: nn.Module, tokens: mx.array, cache=None) -> mx.array:
    """Run `tokens` (shape [B, L]) through the model, filling `cache`; return logits for the LAST position only.

    Shape [B, 1, vocab], equal to `model(tokens, cache=cache)[:, -1:]` but without computing the
    vocabulary head (49152 x 576 for SmolLM2) over every prompt position. Use it for prefill chunks;
    decode steps (L == 1) can call the model as usual. For models whose head is plain (`_plain_head_models`)
    the head runs on the last hidden state; any other model (final softcaps, wrappers) gets all but the
    last token through its body and the last one through its own __call__, so its own post-processing
    makes the logits.
    """
    from mlx_lm.models import gemma3

    if type(model) is gemma3.Model:  # a pure pass-through to its text model
        model = model.language_model
    inner = getattr(model, "model", None)
    if inner is None:
        return model(tokens, cache=cache)[:, -1:]
    if type(model) not in _plain_head_models():
        if tokens.shape[1] > 1:
            inner(tokens[:, :-1], cache=cache)
        return model(tokens[:, -1:], cache=cache)
    h = inner(tokens, cache=cache)[:, -1:]
    head = getattr(model, "lm_head", None)
    if head is not None:
        return head(h)
    return inner.embed_tokens.as_linear(h)
