"""The one-token decode step of a llama-family model as ONE C call per token (app/csrc/decode_step.c).

The per-module path (`CpuBlock`, `CpuAttention`, the cache's `attend_one`) already runs every product in C,
but crosses between Python, MLX and C about ten times a layer (an MLX eval for rope, the cache's slice
writes and copies, numpy norms): on a 135M model that glue cost as much as the math. Here every layer,
the final norm and the vocabulary head run in one kernel call over pointers gathered once:

* `FusedPlan.of(model)` decides ONCE per model whether the step applies (llama blocks the CPU rewrite
  retyped, plain RMSNorm, no q/k norms or biases, no sliding-window layers, 4/8-bit weights for every
  projection and the head, the kernels built) and builds the model and per-layer descriptors.
* `FusedPlan.step` runs a token over a set of compact `SealingKVCache`s (sealed blocks read as
  encoded, fp32 tail). A cache set is bound once (`_Binding`): each layer's tail is copied into a buffer
  the binding made (so the kernel's in-place row writes reach nothing else), with room up to the next
  block boundary, and the block tables' addresses go into the layer descriptors. Per token Python only
  checks the binding still describes the caches, gets rope's cos/sin for the position, calls the kernel
  and bumps the offsets. The token that fills a block (one in 256) takes the model's own path: its cache
  seals the block before attending, so that token attends over the block as encoded, as it always has.
* Anything else (another architecture, a cache that is not compact, a batch, `PARLEY_FUSED_STEP=0`) goes
  to the model's own __call__ unchanged.

Rope's cos/sin come from the model's own rope module applied to a probe vector (ones at the first slot of
each rotated pair, zeros at the second), so every mlx-lm rope variant (llama3 scaling included) gives
MLX's own values; the kernel applies them with MLX's arithmetic. The logits equal the per-module path's
bit for bit (tests/test_decode_step.py).
"""

from __future__ import annotations

import os
import weakref

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from app.model.cpu_attention import CpuAttention
from app.model.cpu_blocks import CpuBlock, CpuMLP
from app.model.cpu_kernels import float16_table, kernels

# descriptor layouts: app/csrc/decode_step.c (DSM_*, DSL_*)
DSM_LAYERS, DSM_DIM, DSM_HEADS, DSM_KV_HEADS, DSM_HEAD_DIM, DSM_INTER, DSM_VOCAB, DSM_TRADITIONAL = range(8)
DSM_EMBED, DSM_NORM, DSM_HEAD, DSM_LUT, DSM_LONGS = 8, 9, 10, 14, 15
DSL_NORM1, DSL_NORM2, DSL_QKV, DSL_O, DSL_GATE_UP, DSL_DOWN = 0, 1, 2, 6, 10, 14
DSL_KSPEC, DSL_VSPEC, DSL_N_BLOCKS, DSL_BLOCKS, DSL_TAIL_K, DSL_TAIL_V, DSL_TAIL_K_HS, DSL_TAIL_V_HS = range(18, 26)
DSL_LONGS = 26
ROPE_ROWS = 256  # positions of rope cos/sin computed at once


def enabled() -> bool:
    """`PARLEY_FUSED_STEP=0` keeps the per-module path (comparisons, benchmarks)."""
    return os.environ.get("PARLEY_FUSED_STEP", "1") != "0"


def _gemv(q4) -> list[int]:
    w, s, b = q4.ptrs
    return [w, s, b, q4.bits]


def _embedding_width(embedding) -> int | None:
    """Row width of the token embedding the step reads: an fp32 table, or a quantized one looked up row by row
    through the module (the CPU path keeps quantized embeddings 4-bit: app.model.cpu_linear); None otherwise."""
    w = getattr(embedding, "weight", None)
    if w is None or w.ndim != 2:
        return None
    if w.dtype == mx.float32:
        return int(w.shape[1]) if np.asarray(memoryview(w)).flags.c_contiguous else None
    bits = getattr(embedding, "bits", None)
    return int(w.shape[1]) * 32 // bits if bits in (4, 8) and "scales" in embedding else None


def _rope_probe(rope, head_dim: int) -> np.ndarray | None:
    """The probe vector for this rope module ([1, 1, 1, D]), or None if the kernel cannot apply it (partial
    rotary dims, an unknown rope class)."""
    if getattr(rope, "dims", None) != head_dim or head_dim % 2 or not callable(rope):
        return None
    probe = np.zeros((1, 1, 1, head_dim), np.float32)
    if getattr(rope, "traditional", False):
        probe[..., 0::2] = 1
    else:
        probe[..., :head_dim // 2] = 1
    return probe


def _same_rope(a, b) -> bool:
    """Do two layers' rope modules compute the same thing (same class and settings)?"""
    if type(a) is not type(b):
        return False
    da, db = vars(a), vars(b)
    if da.keys() != db.keys():
        return False
    for name, x in da.items():
        y = db[name]
        if isinstance(x, mx.array) or isinstance(y, mx.array):
            if not (isinstance(x, mx.array) and isinstance(y, mx.array) and x.shape == y.shape
                    and bool(mx.array_equal(x, y))):
                return False
        elif isinstance(x, (dict, list)) or callable(x):
            if x is not y and x != y:
                return False
        elif x != y:
            return False
    return True


class FusedPlan:
    """One model's descriptors for the fused step, built once; `step` runs a token over a cache set."""

    def __init__(self, model, body, blocks, head_q4, rope, probe):
        attn0 = blocks[0].self_attn
        self.n_layers = len(blocks)
        self.dim = blocks[0].__dict__["_host_norms"][0][0].size
        self.heads, self.kv_heads = attn0.n_heads, attn0.n_kv_heads
        self.head_dim = attn0.__dict__["_qkv"].O // (self.heads + 2 * self.kv_heads)
        self.inter = blocks[0].mlp.__dict__["_down"].K
        self.vocab = head_q4.O
        self.scale = float(attn0.scale)
        self.rope, self.probe = rope, mx.array(probe)
        self._rope_table: tuple[np.ndarray | None, int] = (None, 0)
        self._rope_rows = ROPE_ROWS
        self._embedding = body.embed_tokens
        self.vocab_rows = int(body.embed_tokens.weight.shape[0])
        if body.embed_tokens.weight.dtype == mx.float32:  # the table itself (evaluated by the rewrite)
            self._embed = np.asarray(memoryview(body.embed_tokens.weight))
            self._row = None
        else:  # 4-bit table (kept so at start-up): each token's row is looked up by the module into this buffer
            self._row = np.empty((1, self.dim), np.float32)
            self._embed = self._row
        norm = body.norm
        self._final_norm = np.ascontiguousarray(np.asarray(norm.weight.astype(mx.float32)))
        self._lut = float16_table()
        self.model_desc = np.zeros(DSM_LONGS, np.int64)
        self.model_desc[:DSM_EMBED] = [self.n_layers, self.dim, self.heads, self.kv_heads, self.head_dim,
                                       self.inter, self.vocab, int(bool(getattr(rope, "traditional", False)))]
        self.model_desc[DSM_EMBED] = self._embed.ctypes.data
        self.model_desc[DSM_NORM] = self._final_norm.ctypes.data
        self.model_desc[DSM_HEAD:DSM_HEAD + 4] = _gemv(head_q4)
        self.model_desc[DSM_LUT] = self._lut.ctypes.data
        self.weights = np.zeros((self.n_layers, DSL_LONGS), np.int64)  # the layer descriptors' weight columns
        eps = []
        self._keep = [head_q4]
        for i, block in enumerate(blocks):
            (w1, e1), (w2, e2) = block.__dict__["_host_norms"]
            attn, mlp = block.self_attn, block.mlp
            qkv, o, gate_up, down = attn.__dict__["_qkv"], attn.o_q4(), mlp.__dict__["_gate_up"], mlp.__dict__["_down"]
            self.weights[i, DSL_NORM1], self.weights[i, DSL_NORM2] = w1.ctypes.data, w2.ctypes.data
            for col, q4 in ((DSL_QKV, qkv), (DSL_O, o), (DSL_GATE_UP, gate_up), (DSL_DOWN, down)):
                self.weights[i, col:col + 4] = _gemv(q4)
            self._keep += [w1, w2, qkv, o, gate_up, down]
            eps += [e1, e2]
        self.eps = np.array(eps + [float(norm.eps)], np.float32)
        self.logits = np.empty(self.vocab, np.float32)
        self._bindings: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, model) -> "FusedPlan | None":
        """The plan for `model`, or None when the fused step does not apply to it (see the module docstring)."""
        lib = kernels()
        if lib is None or not hasattr(lib, "decode_step") or lib.q4_fast() != 1:
            return None
        from mlx_lm.models import llama

        if not isinstance(model, llama.Model):
            return None
        body = getattr(model, "model", None)
        blocks = list(getattr(body, "layers", []))
        if not blocks or not all(_block_applies(b) for b in blocks):
            return None
        if type(body.norm) is not nn.RMSNorm or _embedding_width(body.embed_tokens) != blocks[0].__dict__["_host_norms"][0][0].size:
            return None
        head_q4 = _head_q4(model)
        if head_q4 is None or head_q4.K != blocks[0].__dict__["_host_norms"][0][0].size:
            return None
        shapes = {_block_shape(b) for b in blocks}
        if len(shapes) != 1:
            return None
        rope = blocks[0].self_attn.rope
        probe = _rope_probe(rope, shapes.pop()[2])
        if probe is None or not all(_same_rope(rope, b.self_attn.rope) for b in blocks[1:]):
            return None
        return cls(model, body, blocks, head_q4, rope, probe)

    # -- per token ------------------------------------------------------------------------------------------
    def step(self, inputs: mx.array, caches) -> mx.array | None:
        """Logits [1, 1, vocab] for one token over `caches`, or None (nothing done) when they are not a set of
        compact caches the kernel reads: the caller then runs the model's own path."""
        if not enabled() or inputs.size != 1 or not isinstance(caches, list) or len(caches) != self.n_layers:
            return None
        first = caches[0]
        binding = self._bindings.get(first) if _weakrefable(first) else None
        offset = getattr(first, "offset", None)
        if binding is None or not binding.describes(caches, offset):
            binding = self._bind(caches)
            if binding is None:
                return None
        if offset + 1 - binding.base >= caches[0].block_tokens:
            return None  # this token fills the block: the cache seals it before attending (the model's path)
        token = int(inputs.item())
        if not 0 <= token < self.vocab_rows:
            return None
        if self._row is not None:  # the embedding module's own row (what the per-module path adds up)
            row = self._embedding(mx.array([token]))
            mx.eval(row)
            self._row[0] = np.asarray(memoryview(row)).reshape(-1)
            token = 0
        cs = self._rope_cs(offset)
        n_tail = offset - binding.base
        rc = kernels().decode_step(self.model_desc.ctypes.data, binding.desc.ctypes.data, self.eps.ctypes.data,
                                   self.scale, token, cs.ctypes.data, n_tail, self.logits.ctypes.data)
        if rc != 0:
            raise MemoryError("the fused decode step could not allocate its scratch memory")
        binding.advance(caches)
        return mx.array(self.logits).reshape(1, 1, self.vocab)

    def _rope_cs(self, offset: int) -> np.ndarray:
        """cos/sin at position `offset` as the model's rope computes them (see `_rope_probe`).

        From a table of the next ROPE_ROWS positions, made by one call of the rope module over that many
        probe rows (one MLX eval per ROPE_ROWS tokens instead of one a token). A table is used only if its
        first and last rows equal the rope of a single probe at those positions (MLX computes the same
        elementwise ops either way); otherwise every position is computed on its own from then on."""
        table, start = self._rope_table
        if table is not None and start <= offset < start + table.shape[0]:
            return table[offset - start]
        if self._rope_rows == 1:
            return self._rope_at(offset)
        out = self.rope(mx.broadcast_to(self.probe, (1, 1, self._rope_rows, self.head_dim)), offset=offset)
        mx.eval(out)
        table = np.array(memoryview(out), np.float32).reshape(self._rope_rows, self.head_dim)
        last = offset + self._rope_rows - 1
        if not (np.array_equal(table[0], self._rope_at(offset)) and np.array_equal(table[-1], self._rope_at(last))):
            self._rope_rows = 1
            return self._rope_at(offset)
        self._rope_table = (table, offset)
        return table[0]

    def _rope_at(self, offset: int) -> np.ndarray:
        out = self.rope(self.probe, offset=offset)
        mx.eval(out)
        return np.array(memoryview(out), np.float32).reshape(-1)

    def _bind(self, caches) -> "_Binding | None":
        binding = _Binding.of(self, caches)
        if binding is not None and _weakrefable(caches[0]):
            self._bindings[caches[0]] = binding
        return binding


class _Binding:
    """A cache set as the kernel sees it: the layer descriptors with each layer's tail buffer and block table.

    Valid while every layer's cache still holds the tail arrays made here, unwritten by anyone else
    (`tail_writes`: MLX may move an array's data when it is written in place, e.g. a save's fp16 rounding),
    at the offset the last step left; anything else (a prefill, a trim, sealing) and the next step binds
    again.
    """

    def __init__(self, plan: FusedPlan, desc: np.ndarray, tails: list, keep: list, offset: int, base: int,
                 writes: list[int]):
        self.writes = writes  # each cache's tail_writes when bound: any later write may have moved its data
        # the tails weakly: a binding left stale (the caches moved on, no step since) holds no memory of theirs
        self.tails = [(weakref.ref(k), weakref.ref(v)) for k, v in tails]
        self.plan, self.desc, self.keep = plan, desc, keep
        self.offset, self.base = offset, base

    @classmethod
    def of(cls, plan: FusedPlan, caches) -> "_Binding | None":
        first = caches[0]
        if not all(_is_sealing_cache(c) and c.compact for c in caches):
            return None
        offset, base, block = first.offset, first.base, first.block_tokens
        if not all(c.offset == offset and c.base == base and c.block_tokens == block and c.sealed_tokens == base
                   and all(b is not None for b in c.sealed) for c in caches):
            return None
        n_tail = offset - base
        if not 0 <= n_tail < block:
            return None
        Hkv, D = plan.kv_heads, plan.head_dim
        tables = [c.block_table(Hkv, D, D) for c in caches]
        if any(t is None for t in tables):
            return None
        tails = [_own_tail(c, Hkv, D, n_tail, block) for c in caches]
        if any(t is None for t in tails):
            return None
        desc = plan.weights.copy()
        keep = []  # every array the descriptors point into
        for i, (c, t, (k, v)) in enumerate(zip(caches, tables, tails)):
            kspec, vspec = t.specs()
            keep += [kspec, vspec, t.rows]
            desc[i, DSL_KSPEC], desc[i, DSL_VSPEC] = kspec.ctypes.data, vspec.ctypes.data
            desc[i, DSL_N_BLOCKS], desc[i, DSL_BLOCKS] = t.rows.shape[0], t.rows.ctypes.data
            for col, a in ((DSL_TAIL_K, k), (DSL_TAIL_V, v)):
                view = np.asarray(memoryview(a))
                desc[i, col], desc[i, col + 2] = view.ctypes.data, view.strides[1] // 4
            c.keys, c.values = k, v
        return cls(plan, desc, tails, keep, offset, base, [c.tail_writes for c in caches])

    def describes(self, caches, offset) -> bool:
        """Do these caches still hold this binding's tails at the offset it expects?"""
        if offset != self.offset:
            return False
        for c, (k, v), writes in zip(caches, self.tails, self.writes):
            keys = c.keys
            if (keys is None or keys is not k() or c.values is not v() or c.offset != offset or not c.compact
                    or c.tail_writes != writes):
                return False
        return True

    def advance(self, caches) -> None:
        """After the kernel wrote row offset - base of every tail: count the token."""
        self.offset += 1
        for c in caches:
            c.offset = self.offset


def _own_tail(cache, heads: int, dim: int, n_tail: int, rows: int):
    """Fresh fp32 tail buffers [1, heads, rows, dim] holding the cache's first `n_tail` tail rows, which only
    the cache will refer to (the kernel writes the next rows in place). None if the tail is not that shape."""
    k = np.zeros((1, heads, rows, dim), np.float32)
    v = np.zeros((1, heads, rows, dim), np.float32)
    if n_tail:
        if cache.keys is None or cache.keys.dtype != mx.float32 or cache.values.dtype != mx.float32:
            return None
        mx.eval(cache.keys, cache.values)
        old_k, old_v = np.asarray(memoryview(cache.keys)), np.asarray(memoryview(cache.values))
        if old_k.shape[:2] != (1, heads) or old_k.shape[3] != dim or old_v.shape[:2] != (1, heads) \
                or old_v.shape[3] != dim or old_k.shape[2] < n_tail or old_v.shape[2] < n_tail:
            return None
        k[:, :, :n_tail] = old_k[:, :, :n_tail]
        v[:, :, :n_tail] = old_v[:, :, :n_tail]
    mk, mv = mx.array(k), mx.array(v)
    mx.eval(mk, mv)
    return mk, mv


def _is_sealing_cache(cache) -> bool:
    """Exactly app.kvstore.live_cache.SealingKVCache (not a subclass with other update rules), named rather than
    imported: app.kvstore builds on app.model, not the other way round."""
    cls = type(cache)
    return cls.__name__ == "SealingKVCache" and cls.__module__ == "app.kvstore.live_cache"


def _weakrefable(x) -> bool:
    return hasattr(type(x), "__weakref__")


def _block_applies(block) -> bool:
    """A llama block the CPU rewrite retyped, with everything the kernel reads: plain RMSNorms (host copies),
    stacked 4/8-bit q/k/v, o_proj, gate/up and down, no q/k norms, no biases, no sliding window."""
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    if not (isinstance(block, CpuBlock) and isinstance(attn, CpuAttention) and isinstance(mlp, CpuMLP)):
        return False
    if block.__dict__.get("_host_norms") is None or getattr(block, "use_sliding", False) or "q_norm" in attn:
        return False
    qkv, gate_up, down = attn.__dict__.get("_qkv"), mlp.__dict__.get("_gate_up"), mlp.__dict__.get("_down")
    if qkv is None or attn.o_q4() is None or gate_up is None or down is None:
        return False
    if any("bias" in m for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                                 mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
        return False
    H, Hkv = attn.n_heads, attn.n_kv_heads
    dim = block.__dict__["_host_norms"][0][0].size
    D, rest = divmod(qkv.O, H + 2 * Hkv)
    return (rest == 0 and H % Hkv == 0 and qkv.K == dim and attn.o_q4().O == dim and attn.o_q4().K == H * D
            and gate_up.K == dim and gate_up.O == 2 * down.K and down.O == dim
            and attn.q_proj.weight.shape[0] == H * D and attn.k_proj.weight.shape[0] == Hkv * D)


def _block_shape(block) -> tuple[int, int, int, int]:
    attn = block.self_attn
    qkv = attn.__dict__["_qkv"]
    H, Hkv = attn.n_heads, attn.n_kv_heads
    return H, Hkv, qkv.O // (H + 2 * Hkv), block.mlp.__dict__["_down"].K


def _head_q4(model):
    """The vocabulary head's 4/8-bit weights (tied embedding or lm_head without bias), or None."""
    head = getattr(model, "lm_head", None)
    if head is None:
        head = model.model.embed_tokens
    elif "bias" in head:
        return None
    return head.__dict__.get("_q4")


class FusedStepModel:
    """llama `Model` mixin (see app.model.cpu_rewrite): a one-token call over compact caches runs the fused
    step; every other call is the model's own."""

    def _cpu_prepare(self) -> None:
        object.__setattr__(self, "_fused_plan", FusedPlan.of(self))

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None):
        plan = self.__dict__.get("_fused_plan")
        if plan is not None and input_embeddings is None and cache is not None:
            out = plan.step(inputs, cache)
            if out is not None:
                return out
        return super().__call__(inputs, cache=cache, input_embeddings=input_embeddings)


def fused_step_active(model) -> bool:
    """Does `model` have the fused step (and is it on)? For bench reports and doctor."""
    return enabled() and model.__dict__.get("_fused_plan") is not None


def fused_step_bound(model, caches) -> bool:
    """Has the fused step run over this cache set (is it bound to it)? For `parley bench speed`'s report."""
    plan = model.__dict__.get("_fused_plan")
    return plan is not None and bool(caches) and plan._bindings.get(caches[0]) is not None
