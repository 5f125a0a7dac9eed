"""Decode several conversations in one batch, each over its own `ConversationCache` (scenes).

A *ragged* batch: row b of the batch is speaker b, at its own position
(`layers[i].offset` of its own cache). What is batched is what costs on a CPU:
the weight matrices. Every projection, the MLP and the vocabulary head read
their (4-bit) weights once per step for all rows instead of once per row.
Attention is done per row over that speaker's own `SealingKVCache`, so there
is no left padding, no mask and no merged copy of the caches to build before
the round or to split after it: each new key/value goes straight into the
speaker's cache through `update_and_fetch` (which seals full blocks exactly as
in a one-persona chat), and every row computes exactly what the one-persona
decode step computes (same kernels, same order of operations), so greedy
replies are the same token for token, batched or alone.

Paths, fastest first:

* llama-family models rewritten by `app.model.cpu_fast` (our CPU path): the
  4-bit weights go through `q4_rows` below, a C kernel that is the row-batched
  twin of cpu_fast's `q4_gemv` (same per-row arithmetic, weights decoded once
  for up to 8 rows), softmax and SiLU*up through cpu_fast's kernels.
* other llama-family models (Metal, or no C compiler): the same ragged step
  with the model's own modules (quantized matmuls at M = batch) and MLX's
  attention per row.
* anything else: one model call per row (correct, not faster).
"""

from __future__ import annotations

import ctypes

import mlx.core as mx
import mlx.nn as nn

from app.model import ckernels

MAX_ROWS = 8  # rows per kernel call (accumulators kept in registers)

_C_SOURCE = r"""
#include <stddef.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

int q4_rows_fast(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

/* y[B][O] = W x[B][K] for B <= 8 rows, W in MLX's 4-bit layout (group 32, low nibble first),
   w = q * scale + bias per group. Per row this is exactly cpu_fast's q4_gemv (same operations in the
   same order), but each group of weights is loaded and converted once for all B rows. */
void q4_rows(const unsigned char *w, const float *s, const float *b, const float *x, float *y,
             long O, long K, long B) {
    long G = K / 32;
    float xe[8][K / 2], xo[8][K / 2], xs[8][G];
    for (long r = 0; r < B; r++) {
        const float *xr = x + r * K;
        for (long g = 0; g < G; g++) {
            float t = 0.f;
            for (int j = 0; j < 16; j++) {
                xe[r][g * 16 + j] = xr[g * 32 + 2 * j];
                xo[r][g * 16 + j] = xr[g * 32 + 2 * j + 1];
                t += xr[g * 32 + 2 * j] + xr[g * 32 + 2 * j + 1];
            }
            xs[r][g] = t;
        }
    }
    for (long o = 0; o < O; o++) {
        const unsigned char *p = w + o * (K / 2);
        const float *so = s + o * G, *bo = b + o * G;
        float bias[8];
        for (long r = 0; r < B; r++) {
            float t = 0.f;
            for (long g = 0; g < G; g++) t += bo[g] * xs[r][g];
            bias[r] = t;
        }
#ifdef __AVX512F__
        __m512 acc[8];
        for (long r = 0; r < B; r++) acc[r] = _mm512_setzero_ps();
        const __m512i m15 = _mm512_set1_epi32(15);
        for (long g = 0; g < G; g++) {
            __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + g * 16)));
            __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, m15));
            __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
            __m512 sc = _mm512_set1_ps(so[g]);
            for (long r = 0; r < B; r++) {
                __m512 d = _mm512_mul_ps(_mm512_loadu_ps(xe[r] + g * 16), lo);
                d = _mm512_fmadd_ps(_mm512_loadu_ps(xo[r] + g * 16), hi, d);
                acc[r] = _mm512_fmadd_ps(sc, d, acc[r]);
            }
        }
        for (long r = 0; r < B; r++) y[r * O + o] = _mm512_reduce_add_ps(acc[r]) + bias[r];
#else
        for (long r = 0; r < B; r++) {
            float acc = 0.f;
            for (long g = 0; g < G; g++) {
                float d = 0.f;
                const unsigned char *pg = p + g * 16;
                for (int j = 0; j < 16; j++) d += xe[r][g * 16 + j] * (float)(pg[j] & 15) + xo[r][g * 16 + j] * (float)(pg[j] >> 4);
                acc += so[g] * d;
            }
            y[r * O + o] = acc + bias[r];
        }
#endif
    }
}

/* The same for MLX's 8-bit layout (group 32, one weight a byte): cpu_fast's q8_gemv per row. */
void q8_rows(const unsigned char *w, const float *s, const float *b, const float *x, float *y,
             long O, long K, long B) {
    long G = K / 32;
    float xs[8][G];
    for (long r = 0; r < B; r++) {
        const float *xr = x + r * K;
        for (long g = 0; g < G; g++) {
            float t = 0.f;
            for (int j = 0; j < 32; j++) t += xr[g * 32 + j];
            xs[r][g] = t;
        }
    }
    for (long o = 0; o < O; o++) {
        const unsigned char *p = w + o * K;
        const float *so = s + o * G, *bo = b + o * G;
        float bias[8];
        for (long r = 0; r < B; r++) {
            float t = 0.f;
            for (long g = 0; g < G; g++) t += bo[g] * xs[r][g];
            bias[r] = t;
        }
#ifdef __AVX512F__
        __m512 acc[8];
        for (long r = 0; r < B; r++) acc[r] = _mm512_setzero_ps();
        for (long g = 0; g < G; g++) {
            __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + g * 32))));
            __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + g * 32 + 16))));
            __m512 sc = _mm512_set1_ps(so[g]);
            for (long r = 0; r < B; r++) {
                const float *xr = x + r * K;
                __m512 d = _mm512_mul_ps(_mm512_loadu_ps(xr + g * 32), a);
                d = _mm512_fmadd_ps(_mm512_loadu_ps(xr + g * 32 + 16), c, d);
                acc[r] = _mm512_fmadd_ps(sc, d, acc[r]);
            }
        }
        for (long r = 0; r < B; r++) y[r * O + o] = _mm512_reduce_add_ps(acc[r]) + bias[r];
#else
        for (long r = 0; r < B; r++) {
            const float *xr = x + r * K;
            float acc = 0.f;
            for (long g = 0; g < G; g++) {
                float d = 0.f;
                for (int j = 0; j < 32; j++) d += xr[g * 32 + j] * (float)p[g * 32 + j];
                acc += so[g] * d;
            }
            y[r * O + o] = acc + bias[r];
        }
#endif
    }
}
"""
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet


def row_kernels() -> ctypes.CDLL | None:
    """The compiled row-batched kernels (same flags as cpu_fast's, so rows are bitwise its gemv), or None."""
    global _lib
    if _lib is not False:
        return _lib
    _lib = None
    k = ckernels.build("batch_kernels", _C_SOURCE)
    if k is not None:
        L, P = ctypes.c_long, ctypes.c_void_p
        for name in ("q4_rows", "q8_rows"):
            getattr(k, name).argtypes = [P, P, P, P, P, L, L, L]
            getattr(k, name).restype = None
        k.q4_rows_fast.restype = ctypes.c_int
        _lib = k
    return _lib


def _host_rows(x: mx.array):
    """Evaluate `x` (..., K) and view it as a contiguous fp32 numpy array (B, K)."""
    import numpy as np

    mx.eval(x)
    a = np.ascontiguousarray(np.asarray(memoryview(x)), dtype=np.float32)
    return a.reshape(-1, a.shape[-1])


def q4_rows(q4, xa):
    """y = W xa for each row of `xa` (B, K) with cpu_fast's 4/8-bit weights `q4`; returns (B, O) numpy."""
    import numpy as np

    kernel = row_kernels().q4_rows if q4.bits == 4 else row_kernels().q8_rows
    B = xa.shape[0]
    y = np.empty((B, q4.O), np.float32)
    for start in range(0, B, MAX_ROWS):
        n = min(MAX_ROWS, B - start)
        kernel(*q4.ptrs, xa[start].ctypes.data, y[start].ctypes.data, q4.O, q4.K, n)
    return y


# ---------------------------------------------------------------------------
# the batched decode step


class RaggedDecoder:
    """Feeds one token per row through the model; row b attends over `caches[b]` only.

    `step(caches, tokens)` returns next-token logits of shape (B, vocab) and
    leaves each cache one token longer (the caller records the token with
    `ConversationCache.appended`).
    """

    def __init__(self, model):
        self.model = model
        self.mode = _mode(model)

    def step(self, caches, tokens: list[int]) -> mx.array:
        if self.mode == "loop":
            out = [self.model(mx.array([[t]]), cache=c.layers)[:, -1, :] for c, t in zip(caches, tokens)]
            return mx.concatenate(out, axis=0)
        return self._ragged(caches, tokens)

    # -- llama family ------------------------------------------------------
    def _ragged(self, caches, tokens: list[int]) -> mx.array:
        inner = self.model.model
        fast = self.mode == "cpu"
        B = len(tokens)
        h = inner.embed_tokens(mx.array(tokens)[:, None])  # (B, 1, D)
        for i, layer in enumerate(inner.layers):
            r = self._attention(layer.self_attn, layer.input_layernorm(h), [c.layers[i] for c in caches], B, fast)
            h = h + r
            r = self._mlp(layer.mlp, layer.post_attention_layernorm(h), fast)
            h = h + r
        h = inner.norm(h)
        if self.model.args.tie_word_embeddings:
            emb = inner.embed_tokens
            q4 = emb.__dict__.get("_q4") if fast else None
            logits = self._rows(q4, h) if q4 is not None else emb.as_linear(h)
        else:
            head = self.model.lm_head
            q4 = head.__dict__.get("_q4") if fast else None
            logits = self._rows(q4, h) if q4 is not None else head(h)
        return logits[:, -1, :]

    @staticmethod
    def _rows(q4, x: mx.array) -> mx.array:
        y = q4_rows(q4, _host_rows(x))
        return mx.array(y).reshape(*x.shape[:-1], q4.O)

    def _linear(self, module, x: mx.array, fast: bool) -> mx.array:
        q4 = module.__dict__.get("_q4") if fast else None
        if q4 is None:
            return module(x)
        y = self._rows(q4, x)
        return y + module.bias if "bias" in module else y

    def _attention(self, wrapper, x: mx.array, layer_caches, B: int, fast: bool) -> mx.array:
        a = getattr(wrapper, "inner", wrapper)
        H, Hkv = a.n_heads, a.n_kv_heads
        qkv = wrapper.__dict__.get("_qkv") if fast else None
        if qkv is not None:
            y = self._rows(qkv, x)
            nq, nk = a.q_proj.weight.shape[0], a.k_proj.weight.shape[0]
            q, k, v = y[..., :nq], y[..., nq:nq + nk], y[..., nq + nk:]
        else:
            q, k, v = self._linear(a.q_proj, x, fast), self._linear(a.k_proj, x, fast), self._linear(a.v_proj, x, fast)
        q = q.reshape(B, 1, H, -1).transpose(0, 2, 1, 3)
        k = k.reshape(B, 1, Hkv, -1).transpose(0, 2, 1, 3)
        v = v.reshape(B, 1, Hkv, -1).transpose(0, 2, 1, 3)
        if type(a.rope) is nn.RoPE:  # one rope for all rows, each at its own position (bitwise the same)
            offsets = mx.array([c.offset for c in layer_caches])
            q, k = a.rope(q, offset=offsets), a.rope(k, offset=offsets)
        else:
            q = mx.concatenate([a.rope(q[b : b + 1], offset=c.offset) for b, c in enumerate(layer_caches)])
            k = mx.concatenate([a.rope(k[b : b + 1], offset=c.offset) for b, c in enumerate(layer_caches)])
        rows = []
        for b, cache in enumerate(layer_caches):
            kk, vv = cache.update_and_fetch(k[b : b + 1], v[b : b + 1])
            rows.append((q[b : b + 1], kk, vv))
        if fast and all(kk.dtype == mx.float32 for _, kk, _ in rows):
            from app.model import cpu_fast

            attn_decode = getattr(cpu_fast, "_attn_decode", None)
            if attn_decode is not None:  # what cpu_fast's one-token step runs: C kernel over the cache buffers
                mx.eval(rows)
                D = q.shape[-1]
                outs = [attn_decode(qb, kk, vv, a.scale).reshape(1, H, 1, D) for qb, kk, vv in rows]
            else:
                outs = _cpu_attention_rows(a, rows, H, Hkv)
        else:
            from mlx_lm.models.base import scaled_dot_product_attention

            outs = [scaled_dot_product_attention(qb, kk, vv, cache=None, scale=a.scale, mask=None) for qb, kk, vv in rows]
        out = mx.concatenate(outs, axis=0)  # (B, H, 1, D)
        return self._linear(a.o_proj, out.transpose(0, 2, 1, 3).reshape(B, 1, -1), fast)

    def _mlp(self, wrapper, x: mx.array, fast: bool) -> mx.array:
        m = getattr(wrapper, "inner", wrapper)
        gate_up, down = (wrapper.__dict__.get("_gate_up"), wrapper.__dict__.get("_down")) if fast else (None, None)
        if gate_up is None or down is None:
            from mlx_lm.models.activations import swiglu

            return self._linear(m.down_proj, swiglu(self._linear(m.gate_proj, x, fast), self._linear(m.up_proj, x, fast)), fast)
        import numpy as np

        from app.model.cpu_fast import kernels

        y = q4_rows(gate_up, _host_rows(x))  # (B, 2n): gate then up, per row
        n = y.shape[1] // 2
        silu_mul = kernels().silu_mul
        for row in y:
            silu_mul(row.ctypes.data, row[n:].ctypes.data, n)
        g = np.ascontiguousarray(y[:, :n])
        return mx.array(q4_rows(down, g)).reshape(x.shape)


def _cpu_attention_rows(a, rows, H: int, Hkv: int) -> list[mx.array]:
    """cpu_fast's one-token attention, row by row: scaled q.K^T, softmax in its C kernel, then P.V."""
    from app.model.cpu_fast import _fresh, _ptr, kernels

    G = H // Hkv
    scores = []
    for qb, kk, _ in rows:
        D = qb.shape[-1]
        qg = (qb * a.scale).reshape(1, Hkv, G, D)
        scores.append(qg @ kk.swapaxes(-1, -2))  # (1, Hkv, G, T)
    mx.eval(scores)
    outs = []
    softmax = kernels().causal_softmax
    for s, (qb, _, vv) in zip(scores, rows):
        s = _fresh(s)
        T = s.shape[-1]
        softmax(_ptr(s), Hkv * G, 1, T, T - 1, 0)
        outs.append((s @ vv).reshape(1, H, 1, qb.shape[-1]))
    return outs


def _mode(model) -> str:
    """"cpu" (cpu_fast kernels), "llama" (model's own modules, ragged) or "loop" (one call per row)."""
    try:
        from mlx_lm.models import llama
    except ImportError:  # pragma: no cover
        return "loop"
    inner = getattr(model, "model", None)
    if not isinstance(model, llama.Model) or inner is None or getattr(inner, "swa_idx", None) is not None:
        return "loop"
    layer = inner.layers[0]
    attn = layer.self_attn
    if not all(hasattr(getattr(attn, "inner", attn), n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "rope", "n_heads", "n_kv_heads", "scale")):
        return "loop"
    from app.model import cpu_fast

    wrapped = isinstance(attn, cpu_fast._CpuAttention) and isinstance(layer.mlp, cpu_fast._CpuMLP)
    lib = row_kernels() if wrapped else None
    if wrapped and lib is not None and lib.q4_rows_fast() == 1 and cpu_fast.kernels() is not None:
        return "cpu"
    return "llama"
