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
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from app.kvstore.blockfile import HostTensor
from app.kvstore.fast_decode import decode_layers, layer_shape
from app.kvstore.host_block import block_nbytes

BLOCK_TOKENS = 256


class SealingKVCache(KVCache):
    """A KVCache whose completed 256-token blocks are quantized in place."""

    def __init__(self, scheme, block_tokens: int = BLOCK_TOKENS):
        super().__init__()
        self.scheme = scheme
        self.block_tokens = block_tokens
        self.sealed: list[dict[str, mx.array]] = []  # encoded blocks, oldest first

    base = 0  # absolute position of the working copy's first row (sliding-window layers drop old blocks)

    @property
    def sealed_tokens(self) -> int:
        return len(self.sealed) * self.block_tokens

    def update_and_fetch(self, keys, values):
        super().update_and_fetch(keys, values)
        while self.offset - self.sealed_tokens >= self.block_tokens:
            self._seal_next_block()
        return self.keys_and_values()

    def _seal_next_block(self) -> None:
        start, end = self.sealed_tokens - self.base, self.sealed_tokens + self.block_tokens - self.base
        k = self.keys[0, :, start:end, :]
        v = self.values[0, :, start:end, :]
        encoded = self.scheme.encode(k, v)
        dk, dv = self.scheme.decode(encoded, self.keys.dtype)
        self.keys[0, :, start:end, :] = dk
        self.values[0, :, start:end, :] = dv
        self.sealed.append(encoded)

    def trim(self, n: int) -> int:
        n = super().trim(n)
        keep_blocks = self.offset // self.block_tokens
        del self.sealed[keep_blocks:]  # a cut block becomes the full-precision tail again
        return n

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
        a, b = start - self.base, end - self.base
        return self.keys[0, :, a:b, :], self.values[0, :, a:b, :]

    @classmethod
    def restore(cls, scheme, sealed: list[dict], tail_k: mx.array | None, tail_v: mx.array | None,
                dtype: mx.Dtype, block_tokens: int = BLOCK_TOKENS) -> "SealingKVCache":
        """Rebuild the working copy from encoded blocks plus a full-precision tail."""
        cache = cls(scheme, block_tokens)
        cache.sealed = list(sealed)
        has_tail = tail_k is not None and tail_k.shape[1] > 0
        if sealed or has_tail:
            blocks = [{name: [a] for name, a in encoded.items()} for encoded in sealed]
            fast = decode_layers(scheme, 1, blocks, [tail_k] if has_tail else None,
                                 [tail_v] if has_tail else None, dtype, cache.step)
            if fast is not None:
                cache.keys, cache.values, cache.offset = fast[0]
                return cache
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
            cache = cls(scheme, block_tokens)
            cache.sealed = list(sealed[i])
            cache.keys, cache.values, cache.offset = keys, values, offset
            caches.append(cache)
        return caches

    @property
    def encoded_nbytes(self) -> int:
        return sum(block_nbytes(block) for block in self.sealed if block is not None)  # None: dropped (window.py)


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
