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

from app.model import cpu_fast
from app.model.cpu_fast import kernels

MAX_ROWS = 8  # rows per kernel call (accumulators kept in registers; app/csrc/quant_rows.h)


def row_kernels() -> ctypes.CDLL | None:
    """The C kernels with the row-batched gemv (`q4_rows`/`q8_rows`: per row bitwise cpu_fast's gemv), or None."""
    return kernels()


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
            # what cpu_fast's one-token step runs: C kernel over the cache buffers
            mx.eval(rows)
            D = q.shape[-1]
            outs = [cpu_fast.attn_decode(qb, kk, vv, a.scale).reshape(1, H, 1, D) for qb, kk, vv in rows]
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

        y = q4_rows(gate_up, _host_rows(x))  # (B, 2n): gate then up, per row
        n = y.shape[1] // 2
        silu_mul = kernels().silu_mul
        for row in y:
            silu_mul(row.ctypes.data, row[n:].ctypes.data, n)
        g = np.ascontiguousarray(y[:, :n])
        return mx.array(q4_rows(down, g)).reshape(x.shape)


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
    wrapped = isinstance(attn, cpu_fast.CpuAttention) and isinstance(layer.mlp, cpu_fast.CpuMLP)
    lib = row_kernels() if wrapped else None
    if wrapped and lib is not None and lib.q4_rows_fast() == 1 and cpu_fast.kernels() is not None:
        return "cpu"
    return "llama"
