"""llama-style attention retyped for MLX's CPU backend (see app.model.cpu_rewrite).

Prefill: a chunk of more than `FUSED_ROWS` rows runs its whole attention in one C call on the worker pool
(`fused_attention`, app/csrc/prefill_attention.c); a causal chunk of up to `SHORT_CHUNK_ROWS` over a compact
cache (a resumed conversation's new message) attends in C straight over the encoded blocks
(`attend_rows_compact`); anything else (or what the kernels do not take) uses BLAS matmuls for QK^T and PV with the softmax in C. Over a compact cache the keys and values are views of
one scratch buffer shared by every layer (app.kvstore.prefill_scratch), so the output is evaluated here.
Decode (one token): q/k/v through one 4-bit gemv, the attention over the cache buffers in C, o_proj straight
from the host buffer.
"""

from __future__ import annotations

import mlx.core as mx

from app.model.cpu_kernels import data_pointer, fresh, kernels
from app.model.cpu_linear import rows_q4
from app.model.host_exec import Q4Weights, attend_compact, attend_rows_compact, attn_decode_host, host_vector, stack_q4


TILE_ROWS = 256  # query rows per tile of a long prefill chunk's attention
# Causal chunks of up to this many rows over a compact cache attend in C straight over its encoded blocks
# (app/csrc/q4_attention_rows.c): a resumed conversation's new message. Their thin BLAS products over the
# blocks decoded into a scratch cost more in thread hand-offs than in math on the 2-core machines (under
# load, 10-500 ms a layer instead of ~2); longer chunks keep the BLAS path, whose matmuls are wide enough.
SHORT_CHUNK_ROWS = 32
FUSED_ROWS = SHORT_CHUNK_ROWS  # chunks of more rows than this run `fused_attention`


def head_rows(a: mx.array) -> tuple[int, int] | None:
    """(address, head stride in floats) of an evaluated fp32 [1, heads, T, D] array whose rows are contiguous
    (D floats, T * D... apart: a cache buffer's slice has its heads `capacity` rows apart), else None."""
    import numpy as np

    view = np.asarray(memoryview(a))
    if view.dtype != np.float32 or view.ndim != 4 or view.shape[0] != 1:
        return None
    _, heads, T, D = view.shape
    if view.strides[3] != 4 or (T > 1 and view.strides[2] != 4 * D) or view.strides[1] % 4:
        return None
    return view.ctypes.data, view.strides[1] // 4 if heads > 1 else T * D


def fused_attention(qs: mx.array, k: mx.array, v: mx.array, causal: int) -> mx.array | None:
    """softmax(qs K^T) V for one sequence as [1, L, H * Dv] (o_proj's input layout), in one C call:
    [1, H, L, D] scaled queries over [1, Hkv, T, D] keys/values, the queries being the last L positions.
    None when the kernel cannot take these arrays (the caller uses `tiled_attention`). Equal to it within
    fp32 rounding (tests/test_prefill_attention.py). Reads `k`/`v` during the call only: a shared scratch
    is free for the next layer when it returns."""
    _, H, L, Dk = qs.shape
    Hkv, T, Dv = k.shape[1], k.shape[2], v.shape[3]
    if qs.dtype != mx.float32 or k.dtype != mx.float32 or v.dtype != mx.float32 or H % Hkv or T < L:
        return None
    qs = fresh(qs)
    mx.eval(k, v)
    kr, vr = head_rows(k), head_rows(v)
    if kr is None or vr is None:
        return None
    out = fresh(mx.zeros((1, L, H * Dv), mx.float32))
    failed = kernels().prefill_attention(data_pointer(qs), kr[0], vr[0], data_pointer(out), H, Hkv, L, T, Dk, Dv,
                                         L * Dk, kr[1], vr[1], T - L, causal)
    return None if failed else out


def tiled_attention(qs: mx.array, k: mx.array, v: mx.array, causal: int) -> mx.array:
    """softmax(qs K^T) V for one sequence ([1, H, L, D] scaled queries over [1, Hkv, T, D] keys/values, the
    last L positions being the queries'), a tile of at most `TILE_ROWS` query rows of one head at a time.

    The whole chunk at once (a 512-token chunk over 4K positions: 9 x 512 x 4096 scores, 75 MB) wrote the
    scores to memory, read them back for the softmax, then again for PV; a tile's scores (4 MB) stay in the
    CPU caches between the three steps: ~30% less time for a long chunk's attention; and a causal tile skips
the keys after its last query (masked for all its rows: ~11% of a 4K prompt's scores). Each tile is evaluated
    before the next (its scores freed), so the result holds no reference to `k`/`v` (a shared scratch is
    free for the next layer). Same products as the whole-chunk path, summed per row the same way, up to
    BLAS's blocking (fp32 rounding)."""
    _, H, L, D = qs.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = H // Hkv
    mx.eval(qs)
    tiles = []
    for h in range(H):
        for l0 in range(0, L, TILE_ROWS):
            n = min(TILE_ROWS, L - l0)
            seen = T - L + l0 + n if causal else T  # keys after the tile's last query are masked for all its rows
            kh, vh = k[:, h // G, :seen], v[:, h // G, :seen]
            scores = fresh(qs[:, h, l0:l0 + n] @ kh.swapaxes(-1, -2))  # [1, n, seen]
            kernels().causal_softmax(data_pointer(scores), n, n, seen, T - L + l0, causal)
            tile = scores @ vh
            mx.eval(tile)
            tiles.append(tile)
    return mx.concatenate(tiles, axis=1).reshape(1, H, L, D)


class CpuAttention:
    """llama-style attention for the CPU: BLAS matmuls for QK^T and PV, softmax in the C kernel.

    Mixed into the model's own attention class by `_retype` (projections and rope used as they are).
    Falls back to the original __call__ for masks other than None/"causal" and for caches that
    do not hand back plain fp32 keys/values (e.g. mlx-lm's QuantizedKVCache).
    """

    def _cpu_prepare(self) -> None:
        object.__setattr__(self, "_qkv", stack_q4([self.q_proj, self.k_proj, self.v_proj]))

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
        elif qkv is not None and B == 1 and L <= SHORT_CHUNK_ROWS:  # a short chunk: one 4-bit row call for all three
            y = rows_q4(qkv, x)  # each output row the same sums as its own layer's call: bitwise the same
            nq, nk = a.q_proj.weight.shape[0], a.k_proj.weight.shape[0]
            q, k, v = y[..., :nq], y[..., nq:nq + nk], y[..., nq + nk:]
        else:
            q, k, v = a.q_proj(x), a.k_proj(x), a.v_proj(x)
        q, k = self._qk_heads(q, k, B, L)
        v = v.reshape(B, L, Hkv, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q = a.rope(q, offset=offset)
        k = a.rope(k, offset=offset)
        out = attend_compact(cache, q, k, v, a.scale) if B * L == 1 else None
        if B == 1 and 1 < L <= SHORT_CHUNK_ROWS and isinstance(mask, str) and cache is not None:
            rows = attend_rows_compact(cache, q, k, v, a.scale)
            if rows is not None:
                return a.o_proj(mx.array(rows).reshape(1, L, -1))
        shared = out is None and B * L > 1 and hasattr(cache, "update_and_fetch_shared")
        if shared:  # k/v may be views of a scratch the next layer overwrites: `out` is evaluated below
            k, v = cache.update_and_fetch_shared(k, v)
        elif cache is not None and out is None:
            k, v = cache.update_and_fetch(k, v)
        if out is None and k.dtype != mx.float32:
            tail = super().__call__(x, mask, cache) if cache is None else self._mlx_tail(q, k, v, mask, B, L)
            if shared:
                mx.eval(tail)
            return tail
        D = q.shape[-1]
        if B * L == 1:
            out = attn_decode_host(q, k, v, a.scale) if out is None else out
            o = self.o_q4()
            if o is not None:  # o_proj straight from the host buffer: an MLX array built from numpy needs no eval
                return mx.array(o.numpy(out).reshape(1, 1, o.O))
            return a.o_proj(mx.array(out).reshape(1, 1, H * D))
        causal = int(mask is not None and L > 1)
        fused = fused_attention(q * a.scale, k, v, causal) if B == 1 and L > FUSED_ROWS else None
        if fused is not None:
            return a.o_proj(fused)
        if B == 1 and L >= TILE_ROWS // 2:
            out = tiled_attention(q * a.scale, k, v, causal)
        else:
            T = k.shape[2]
            # GQA without repeating K/V: the G query heads of a KV head become G*L rows.
            qg = (q * a.scale).reshape(B, Hkv, G * L, D)
            scores = fresh(qg @ k.swapaxes(-1, -2))  # [B, Hkv, G*L, T]
            kernels().causal_softmax(data_pointer(scores), B * Hkv * G * L, L, T, T - L, causal)
            out = (scores @ v).reshape(B, H, L, D)
            if shared:
                mx.eval(out)
        return a.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def _qk_heads(self, q, k, B: int, L: int):
        """Queries and keys split into heads, [B, heads, L, D], through the model's q/k norms where it has them
        (qwen3, gemma3: RMSNorm over each head's vector, as the model's own __call__ applies them)."""
        q = q.reshape(B, L, self.n_heads, -1)
        k = k.reshape(B, L, self.n_kv_heads, -1)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        return q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)

    def o_q4(self) -> "Q4Weights | None":
        # the attention output is n_heads * (q_proj rows / n_heads) wide; not every model names head_dim (qwen2/3)
        o = self.o_proj.__dict__.get("_q4")
        return o if o is not None and "bias" not in self.o_proj and o.K == self.q_proj.weight.shape[0] else None

    def decode_host(self, xa, cache):
        """The one-token step of __call__ from a host (numpy) input row to o_proj's host output, or None.

        The same operations as __call__'s decode path (q/k/v gemv, MLX rope, the cache's own
        update_and_fetch, C attention, o_proj gemv): same values, same cache contents.
        """
        a = self
        qkv, o = self.__dict__.get("_qkv"), self.o_q4()
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
        out = attend_compact(cache, q, k, v, a.scale)
        if out is not None:
            return o.numpy(out)
        k, v = cache.update_and_fetch(k, v)
        if k.dtype != mx.float32:  # as __call__ does
            return host_vector(self._mlx_tail(q, k, v, None, 1, 1))
        return o.numpy(attn_decode_host(q, k, v, a.scale))

    def _mlx_tail(self, q, k, v, mask, B, L):
        from mlx_lm.models.base import scaled_dot_product_attention

        a = self
        out = scaled_dot_product_attention(q, k, v, cache=None, scale=a.scale, mask=mask)
        return a.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))
