"""The per-layer KV cache the model attends over, sealed into quantized blocks.

Every 256 tokens a block is *sealed*: the scheme encodes its keys and values
(what goes to disk and what idle caches keep in RAM), and the full-precision
working copy of that block is overwritten with the decoded values. Live and
restored caches therefore hold bit-identical keys and values: restoring a
conversation from disk gives exactly the logits the live cache would have.
The newest, unfinished block stays in full precision until it fills (stored
as fp16: on the fp32 CPU path the tail is rounded to fp16 in place when it is
saved, so the stored tail is exact at half the size).

Subclassing mlx-lm's `KVCache` keeps its growth strategy, masks and `trim`,
so any mlx-lm model attends over it unchanged.

Compact mode (the default on the CPU path, where the C kernel of
`app.kvstore.block_attention` builds and the scheme is one it reads): sealed
blocks are kept ONLY encoded; the working copy holds just the tail (from `base`
= the sealed tokens on). The one-token step attends over the encoded blocks
in C (`attend_one`, called by `app.model.cpu_fast`'s attention), so does a causal chunk of a few dozen
rows (`attend_rows`: a resumed conversation's new message), a longer prefill chunk
gets the blocks decoded for that call (`update_and_fetch_shared`: into one
scratch buffer shared by every layer, app.kvstore.prefill_scratch; other
callers: fresh arrays freed after the call), and a restore has nothing to
decode. Whatever asks for the full keys of a one-token step some other way
(another architecture's attention, the batched engine, a windowed layer, fp16
caches on Metal) turns the cache back into the full working copy once
(`materialize`), with the very values sealing used to write back.
`PARLEY_KV_COMPACT=0` keeps every cache in the full form.
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from app.kvstore import block_attention, prefill_scratch
from app.kvstore.blockfile import HostTensor
from app.kvstore.fast_decode import decode_layers, layer_shape
from app.kvstore.host_block import LayerBlock, block_nbytes

BLOCK_TOKENS = 256


class SealingKVCache(KVCache):
    """A KVCache whose completed 256-token blocks are quantized in place."""

    def __init__(self, scheme, block_tokens: int = BLOCK_TOKENS, compact: bool | None = None):
        super().__init__()
        self.scheme = scheme
        self.block_tokens = block_tokens
        self.sealed: list[dict[str, mx.array]] = []  # encoded blocks, oldest first
        self.compact = compact_applies(scheme) if compact is None else compact
        self._table: block_attention.BlockTable | None = None

    base = 0  # absolute position of the working copy's first row (compact caches, sliding-window layers)
    # In-place writes into the working copy so far: MLX may move an array's data when it is written, so the
    # fused decode step (app.model.decode_step), which writes rows into it from C, checks this count.
    tail_writes = 0

    @property
    def sealed_tokens(self) -> int:
        return len(self.sealed) * self.block_tokens

    def update_and_fetch(self, keys, values):
        if self.compact and (keys.shape[2] == 1 or keys.dtype != mx.float32):
            self.materialize()  # a one-token step that wants the full keys: not the C attention's caller
        self._append(keys, values)
        if self.compact:
            return self._full_keys_and_values()
        return self.keys_and_values()

    def update_and_fetch_shared(self, keys, values):
        """`update_and_fetch` for a prefill chunk whose caller evaluates what reads the result before the next
        layer runs (`CpuAttention`): a compact cache hands back views of the thread's shared prefill scratch
        (app.kvstore.prefill_scratch), its blocks decoded there in one C call, no fresh arrays."""
        if not self.compact:  # the full form (also every subclass's own update, e.g. windowed layers)
            return self.update_and_fetch(keys, values)
        if keys.shape[2] == 1 or keys.dtype != mx.float32:
            self.materialize()
            return self.update_and_fetch(keys, values)
        self._append(keys, values)
        shared = self._scratch_keys_and_values(keys.shape[1], keys.shape[3], values.shape[3])
        return shared if shared is not None else self._full_keys_and_values()

    def _scratch_keys_and_values(self, heads: int, dk: int, dv: int) -> tuple[mx.array, mx.array] | None:
        table = self._block_table(heads, dk, dv) if self.sealed else None
        if self.sealed and (table is None or table.tokens != self.base):
            return None
        n_tail = self.offset - self.base
        if n_tail:
            mx.eval(self.keys, self.values)
        if table is None:
            return self.keys_and_values()
        return prefill_scratch.keys_and_values(table, self.keys, self.values, n_tail)

    def _append(self, keys, values) -> None:
        """KVCache's growth and insert, on working-copy positions (from `base`), then seal full blocks."""
        base = self.base
        self.tail_writes += 1
        self.offset -= base
        try:
            KVCache.update_and_fetch(self, keys, values)
        finally:
            self.offset += base
        while self.offset - self.sealed_tokens >= self.block_tokens:
            self._seal_next_block()

    def keys_and_values(self):
        n = self.offset - self.base
        return self.keys[..., :n, :], self.values[..., :n, :]

    def _seal_next_block(self) -> None:
        start, end = self.sealed_tokens - self.base, self.sealed_tokens + self.block_tokens - self.base
        k = self.keys[0, :, start:end, :]
        v = self.values[0, :, start:end, :]
        encoded = self.scheme.encode(k, v)
        self.sealed.append(encoded)
        if self.compact:  # the block leaves the working copy: only its encoded form is kept
            self.keys = mx.contiguous(self.keys[..., end:, :])
            self.values = mx.contiguous(self.values[..., end:, :])
            mx.eval(self.keys, self.values)  # the old buffers go now, not at the next eval
            self.base += end
            return
        dk, dv = self.scheme.decode(encoded, self.keys.dtype)
        self.tail_writes += 1
        self.keys[0, :, start:end, :] = dk
        self.values[0, :, start:end, :] = dv

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        keep_blocks = (self.offset - n) // self.block_tokens
        if self.compact and keep_blocks < len(self.sealed):  # cut blocks become the full-precision tail again
            k, v = self._decoded(keep_blocks, len(self.sealed))
            self._prepend(k, v)
            self.base = keep_blocks * self.block_tokens
        n = super().trim(n)
        del self.sealed[keep_blocks:]  # a cut block becomes the full-precision tail again
        return n

    # -- compact mode -----------------------------------------------------------
    def attend_one(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> np.ndarray | None:
        """The one-token decode step over this compact cache: append `k`/`v` ([1, Hkv, 1, D]), then
        softmax(scale q K^T) V over the encoded blocks and the tail, in C. Returns H * Dv fp32 (host
        memory), or None after turning the cache back into the full form (the caller then updates and
        attends as usual) when the kernel cannot read these blocks or arrays."""
        if not self.compact:
            return None
        if (q.dtype != mx.float32 or k.dtype != mx.float32 or q.shape[1] % k.shape[1] or q.shape[3] != k.shape[3]
                or self._block_table(k.shape[1], k.shape[3], v.shape[3]) is None):
            self.materialize()
            return None
        self._append(k, v)
        table = self._block_table(k.shape[1], k.shape[3], v.shape[3])
        if table is None:
            self.materialize()
            return None
        mx.eval(q, self.keys, self.values)
        n_tail = self.offset - self.base
        qa = np.asarray(memoryview(q))
        tk = np.ascontiguousarray(np.asarray(memoryview(self.keys))[0]) if n_tail else None
        tv = np.ascontiguousarray(np.asarray(memoryview(self.values))[0]) if n_tail else None
        return block_attention.attend(table, qa, tk, tv, n_tail, scale)

    def attend_rows(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> np.ndarray | None:
        """A short prefill chunk over this compact cache: append `k`/`v` ([1, Hkv, L, D]), then causal
        softmax(scale q K^T) V of the L rows of `q` ([1, H, L, D], the last L positions) over the encoded
        blocks and the tail, in C (block_attention.attend_rows), no decoded copy of the blocks. Returns
        (L, H * Dv) fp32 (host memory), or None with nothing appended when it does not apply (the caller
        then updates and attends as usual)."""
        if (not self.compact or q.dtype != mx.float32 or k.dtype != mx.float32 or v.dtype != mx.float32
                or q.shape[0] != 1 or k.shape[0] != 1 or q.shape[1] % k.shape[1] or q.shape[3] != k.shape[3]
                or q.shape[2] != k.shape[2]):
            return None
        heads, dk, dv = k.shape[1], k.shape[3], v.shape[3]
        table = self._block_table(heads, dk, dv)
        if table is None or table.tokens != self.base:
            return None
        self._append(k, v)
        table = self._block_table(heads, dk, dv)
        q = mx.contiguous(q)
        mx.eval(q, self.keys, self.values)
        n_tail = self.offset - self.base
        qa = np.asarray(memoryview(q))[0]
        tk = np.asarray(memoryview(self.keys))[0] if n_tail else None
        tv = np.asarray(memoryview(self.values))[0] if n_tail else None
        if table is not None and table.tokens == self.base:
            try:
                return block_attention.attend_rows(table, qa, tk, tv, n_tail, scale)
            except block_attention.Unsupported:
                pass
        return self._attend_rows_decoded(q, scale)  # appended already: attend the plain way over every position

    def _attend_rows_decoded(self, q: mx.array, scale: float) -> np.ndarray:
        """`attend_rows`' fallback once the chunk is appended: MLX's attention over every position decoded."""
        k, v = self._full_keys_and_values()
        L, total = q.shape[2], k.shape[2]
        seen = mx.arange(total)[None] <= (total - L + mx.arange(L))[:, None]  # row l: positions up to its own
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=seen)
        return np.array(out[0].transpose(1, 0, 2).reshape(q.shape[2], -1))

    def block_table(self, heads: int, dk: int, dv: int) -> block_attention.BlockTable | None:
        """The sealed blocks as the attention kernel reads them (also app.model.decode_step's fused step)."""
        return self._block_table(heads, dk, dv)

    def _block_table(self, heads: int, dk: int, dv: int) -> block_attention.BlockTable | None:
        """The kernel's view of the sealed blocks, kept in step with `sealed`; None if it cannot read them."""
        try:
            if self._table is None or (self._table.h, self._table.dk, self._table.dv) != (heads, dk, dv):
                self._table = block_attention.BlockTable(self.scheme, heads, dk, dv)
            self._table.sync(self.sealed)
            return self._table
        except block_attention.Unsupported:
            self._table = None
            return None

    def materialize(self) -> None:
        """Leave compact mode: decode the sealed blocks back in front of the tail (what sealing writes back)."""
        if not self.compact:
            return
        self.compact = False
        self._table = None
        if self.sealed and self.base:
            k, v = self._decoded(0, self.base // self.block_tokens)
            self._prepend(k, v)
            self.base = 0
        if self.keys is not None:
            self.keys, self.values = _with_headroom(self.keys, self.step), _with_headroom(self.values, self.step)
            mx.eval(self.keys, self.values)

    def _prepend(self, k: mx.array, v: mx.array) -> None:
        """Put decoded rows (H, T, D) in front of the working copy's rows [base, offset)."""
        n = self.offset - self.base
        if self.keys is not None and n:
            k = mx.concatenate([k, self.keys[0, :, :n, :].astype(k.dtype)], axis=1)
            v = mx.concatenate([v, self.values[0, :, :n, :].astype(v.dtype)], axis=1)
        self.keys, self.values = k[None], v[None]

    def _full_keys_and_values(self) -> tuple[mx.array, mx.array]:
        """Keys and values of every position (a prefill chunk attends over all): the sealed blocks
        decoded for this call only, then the tail."""
        tk, tv = self.keys_and_values()
        if not self.sealed:
            return tk, tv
        k, v = self._decoded(0, len(self.sealed))
        return mx.concatenate([k[None], tk], axis=2), mx.concatenate([v[None], tv], axis=2)

    def _decoded(self, first: int, last: int) -> tuple[mx.array, mx.array]:
        """Encoded blocks [first, last) decoded to fp32 (H, T, D): the values sealing writes back.

        In C straight from the blocks' buffers (block files' host memory too, without making MLX
        arrays of them) where `fast_decode` applies, else with the scheme's MLX decode."""
        blocks = [_decoder_input(b) for b in self.sealed[first:last]]
        dtype = self.keys.dtype if self.keys is not None else mx.float32
        fast = decode_layers(self.scheme, 1, blocks, None, None, dtype, 1) if blocks else None
        if fast is not None:
            keys, values, _ = fast[0]
            return keys[0], values[0]
        parts = [self.scheme.decode(b, dtype) for b in self.sealed[first:last]]
        return mx.concatenate([k for k, _ in parts], axis=1), mx.concatenate([v for _, v in parts], axis=1)

    @staticmethod
    def round_tails_to_fp16(layers: list["SealingKVCache"]) -> None:
        """Make the fp32 tails of these layers hold fp16-exact values, in place, so they are stored
        losslessly at half the bytes.

        Done when the cache is saved rather than on every token: the decode loop
        stays free of extra ops, and from the save on, live and stored agree bit for bit.
        The rounded tails are evaluated before they are written back, so nothing but the
        cache refers to the working copies then and MLX updates them in place instead of
        copying them whole (that copy made a save cost more the longer the conversation).
        """
        todo = [c for c in layers if c.keys is not None and c.keys.dtype == mx.float32 and c.offset > c.sealed_tokens]
        rounded = [[b[..., c.sealed_tokens - c.base:c.offset - c.base, :].astype(mx.float16).astype(mx.float32)
                    for b in (c.keys, c.values)] for c in todo]
        mx.eval(rounded)
        for c, (k, v) in zip(todo, rounded):
            start, end = c.sealed_tokens - c.base, c.offset - c.base
            c.tail_writes += 1
            c.keys[..., start:end, :] = k
            c.values[..., start:end, :] = v

    def tail(self) -> tuple[mx.array, mx.array]:
        """Keys and values after the last sealed block, shape (heads, T, dim)."""
        start = self.sealed_tokens
        if self.keys is None or self.offset == start:
            shape_k = (0, 0, 0) if self.keys is None else (self.keys.shape[1], 0, self.keys.shape[3])
            shape_v = (0, 0, 0) if self.values is None else (self.values.shape[1], 0, self.values.shape[3])
            return mx.zeros(shape_k), mx.zeros(shape_v)
        return self.span(start, self.offset)

    def span(self, start: int, end: int) -> tuple[mx.array, mx.array]:
        """Keys and values of absolute positions [start, end), shape (heads, end - start, dim)."""
        if start < self.base:  # rows only the encoded blocks hold
            first = start // self.block_tokens
            k, v = self._decoded(first, min(self.base, end + self.block_tokens - 1) // self.block_tokens)
            if end > self.base:
                wk, wv = self.span(self.base, end)
                k, v = mx.concatenate([k, wk], axis=1), mx.concatenate([v, wv], axis=1)
            a = start - first * self.block_tokens
            return k[:, a:a + end - start], v[:, a:a + end - start]
        a, b = start - self.base, end - self.base
        return self.keys[0, :, a:b, :], self.values[0, :, a:b, :]

    @classmethod
    def restore(cls, scheme, sealed: list[dict], tail_k: mx.array | None, tail_v: mx.array | None,
                dtype: mx.Dtype, block_tokens: int = BLOCK_TOKENS) -> "SealingKVCache":
        """Rebuild the working copy from encoded blocks plus a full-precision tail (compact caches: just
        take the blocks as they are and the tail)."""
        cache = cls(scheme, block_tokens, compact=compact_applies(scheme, dtype))
        cache.sealed = list(sealed)
        has_tail = tail_k is not None and tail_k.shape[1] > 0
        if cache.compact:
            return cache._adopt(tail_k if has_tail else None, tail_v if has_tail else None, dtype)
        if sealed or has_tail:
            blocks = [{name: [a] for name, a in encoded.items()} for encoded in sealed]
            fast = decode_layers(scheme, 1, blocks, [tail_k] if has_tail else None,
                                 [tail_v] if has_tail else None, dtype, cache.step)
            if fast is not None:
                cache.keys, cache.values, cache.offset = fast[0]
                return cache
        cache.compact = False
        parts_k, parts_v = [], []
        for encoded in sealed:
            k, v = scheme.decode(encoded, dtype)
            parts_k.append(k)
            parts_v.append(v)
        if tail_k is not None and tail_k.shape[1] > 0:
            parts_k.append(tail_k.astype(dtype))
            parts_v.append(tail_v.astype(dtype))
        cache.sealed = list(sealed)
        if parts_k:
            keys = mx.concatenate(parts_k, axis=1)[None]
            values = mx.concatenate(parts_v, axis=1)[None]
            cache.offset = keys.shape[2]
            # leave room to grow, as KVCache would after a prefill
            cache.keys, cache.values = _with_headroom(keys, cache.step), _with_headroom(values, cache.step)
        return cache

    @classmethod
    def restore_layers(cls, scheme, blocks: list[dict], sealed: list[list[dict]], tail_k, tail_v,
                       dtype: mx.Dtype, block_tokens: int = BLOCK_TOKENS) -> list["SealingKVCache"]:
        """`restore` for every layer at once, decoding straight into the working copies (C kernels).

        `blocks`: per sealed block, name -> array stacked over layers (a block file's arrays) or name ->
        list of per-layer arrays; `sealed[i]`: layer i's encoded blocks as the cache keeps them;
        `tail_k`/`tail_v`: stacked (L, H, T, D) (MLX or `HostTensor`) or per-layer lists, or None. Same result as `restore`
        layer by layer (which it falls back to when the C path does not apply).
        """
        n_layers = len(sealed)
        has_tail = tail_k is not None and layer_shape(tail_k)[1] > 0
        step = cls(scheme, block_tokens).step
        if compact_applies(scheme, dtype):  # nothing to decode
            return [cls.restore(scheme, sealed[i], _layer_of(tail_k, i) if has_tail else None,
                                _layer_of(tail_v, i) if has_tail else None, dtype, block_tokens) for i in range(n_layers)]
        fast = decode_layers(scheme, n_layers, blocks, tail_k if has_tail else None,
                             tail_v if has_tail else None, dtype, step) if n_layers else None
        if fast is None:
            return [cls.restore(scheme, sealed[i], _layer_of(tail_k, i), _layer_of(tail_v, i), dtype, block_tokens)
                    for i in range(n_layers)]
        return cls.from_working_copies(scheme, sealed, fast, block_tokens)

    @classmethod
    def from_working_copies(cls, scheme, sealed: list[list], copies: list[tuple], block_tokens: int = BLOCK_TOKENS
                            ) -> list["SealingKVCache"]:
        """Caches over working copies already decoded: `copies[i]` = (keys, values, offset) of layer i."""
        caches = []
        for i, (keys, values, offset) in enumerate(copies):
            cache = cls(scheme, block_tokens, compact=False)
            cache.sealed = list(sealed[i])
            cache.keys, cache.values, cache.offset = keys, values, offset
            caches.append(cache)
        return caches

    def _adopt(self, tail_k, tail_v, dtype) -> "SealingKVCache":
        """This compact cache over its `sealed` blocks plus the tail (H, T, D) or None: no decoding."""
        self.base = self.offset = self.sealed_tokens
        if tail_k is not None:
            self.keys = _with_headroom(tail_k.astype(dtype)[None], self.step)
            self.values = _with_headroom(tail_v.astype(dtype)[None], self.step)
            self.offset += tail_k.shape[1]
        elif self.sealed:  # an empty tail buffer of the blocks' shape, ready for the next token
            heads, dk, dv = _block_shape(self.sealed[0])
            self.keys = mx.zeros((1, heads, self.step, dk), dtype)
            self.values = mx.zeros((1, heads, self.step, dv), dtype)
        return self

    @property
    def encoded_nbytes(self) -> int:
        return sum(block_nbytes(block) for block in self.sealed if block is not None)  # None: dropped (window.py)


def compact_applies(scheme, dtype=mx.float32) -> bool:
    """Keep caches of this scheme compact (sealed blocks only encoded)? On fp32 working copies when the
    C kernel builds and reads the scheme, unless `PARLEY_KV_COMPACT=0`."""
    return (dtype == mx.float32 and os.environ.get("PARLEY_KV_COMPACT", "1") != "0"
            and block_attention.scheme_applies(scheme) and block_attention.kernels() is not None)


def _decoder_input(block) -> dict:
    """One layer's block as `fast_decode.decode_layers` takes it for a single layer (no copies)."""
    if isinstance(block, LayerBlock):
        return {name: HostTensor(t.data[block.index:block.index + 1], t.dtype) for name, t in block.host.items()}
    return {name: [a] for name, a in block.items()}


def _block_shape(block) -> tuple[int, int, int]:
    """(KV heads, key dim, value dim) of one layer's encoded block."""
    dims = block.host["dims"].data[block.index] if isinstance(block, LayerBlock) else np.asarray(block["dims"])
    first = "k" if "k" in block else "k_q"
    heads = block.host[first].data.shape[1] if isinstance(block, LayerBlock) else block[first].shape[0]
    return int(heads), int(dims[0]), int(dims[1])


def _layer_of(tails, i: int) -> mx.array | None:
    """Layer i of tails stacked over layers (MLX or host memory) or of a per-layer list."""
    if tails is None:
        return None
    return tails.to_mx(i) if isinstance(tails, HostTensor) else tails[i]


def _with_headroom(x: mx.array, step: int) -> mx.array:
    n = x.shape[2]
    room = (-n) % step
    if room == 0:
        return x
    pad = mx.zeros((*x.shape[:2], room, x.shape[3]), x.dtype)
    return mx.concatenate([x, pad], axis=2)
