"""Sliding-window layers (Gemma 3's local layers) keep only the blocks their window still needs.

A local layer's query at position p attends to keys in (p - window, p]. Its
`WindowedKVCache` is a `SealingKVCache` whose full-precision working copy
starts at `base`, a block boundary below the oldest key the next query can
see: older whole blocks leave the working copy (the dominant RAM: fp32) as
soon as they are sealed and out of reach. Their encoded blocks stay (what is
saved to disk and what an edit that cuts back into them decodes again), so a
trim, a prefix copy or a save gives exactly what the full cache would. The
attention mask (`make_mask`) covers the kept keys only, with the window.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from app.kvstore.live_cache import SealingKVCache


class WindowedKVCache(SealingKVCache):
    window: int

    @classmethod
    def adopt(cls, layer: SealingKVCache, window: int) -> "WindowedKVCache":
        """Turn `layer` (a full cache of a sliding-window layer) into a windowed one, in place."""
        layer.materialize()  # windowed layers keep their own (fp32) working copy
        layer.__class__ = cls
        layer.window = window
        layer.base = 0
        layer._slide(layer._next_base())
        return layer

    def _next_base(self) -> int:
        """Where the working copy may start before the next tokens arrive: no key the next query can see,
        and no unsealed token, lies below it."""
        need = min(self.offset - self.window + 1, self.sealed_tokens)
        return max(self.base, need // self.block_tokens * self.block_tokens) if need > 0 else self.base

    def _slide(self, new_base: int) -> None:
        drop = new_base - self.base
        if drop <= 0 or self.keys is None:
            return
        self.keys = mx.contiguous(self.keys[..., drop:, :])
        self.values = mx.contiguous(self.values[..., drop:, :])
        mx.eval(self.keys, self.values)  # the old buffers go now, not at the next eval
        self.base = new_base

    def update_and_fetch(self, keys, values):
        self._slide(self._next_base())
        base = self.base
        self.offset -= base  # KVCache's growth and insert work on working-copy positions
        try:
            KVCache.update_and_fetch(self, keys, values)
        finally:
            self.offset += base
        while self.offset - self.sealed_tokens >= self.block_tokens:
            self._seal_next_block()
        return self.keys_and_values()

    def keys_and_values(self):
        n = self.offset - self.base
        return self.keys[..., :n, :], self.values[..., :n, :]

    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False):
        """Causal (and windowed) mask of the next N queries over the keys this cache will hold for them."""
        base = self._next_base()
        linds = mx.arange(self.offset, self.offset + N)[:, None]
        rinds = mx.arange(base, self.offset + N)[None]
        mask = linds >= rinds
        if window_size is not None:
            mask = mask & (linds < rinds + window_size)
        return mask

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        want = max(0, self.offset - n - self.window + 1) // self.block_tokens * self.block_tokens
        if want < self.base and self.keys is not None:  # cut back into dropped blocks: decode them again
            k, v = self._decoded(want // self.block_tokens, self.base // self.block_tokens)
            self.keys = mx.concatenate([k[None], self.keys], axis=2)
            self.values = mx.concatenate([v[None], self.values], axis=2)
            self.base = want
        return super().trim(n)

    def span(self, start: int, end: int) -> tuple[mx.array, mx.array]:
        if start >= self.base:
            return super().span(start, end)
        first = start // self.block_tokens
        k, v = self._decoded(first, min(self.base, end + self.block_tokens - 1) // self.block_tokens)
        if end > self.base:
            wk, wv = super().span(self.base, end)
            k, v = mx.concatenate([k, wk], axis=1), mx.concatenate([v, wv], axis=1)
        a = start - first * self.block_tokens
        return k[:, a:a + end - start], v[:, a:a + end - start]

    def _decoded(self, first: int, last: int) -> tuple[mx.array, mx.array]:
        """Encoded blocks [first, last) decoded: the values the working copy held (sealing wrote them back)."""
        parts = [self.scheme.decode(self.sealed[i], self.keys.dtype) for i in range(first, last)]
        return mx.concatenate([k for k, _ in parts], axis=1), mx.concatenate([v for _, v in parts], axis=1)


def apply_windows(cache, windows: list[int | None]) -> None:
    """Make the sliding-window layers of a `ConversationCache` windowed (once; nothing to do without windows)."""
    for layer, window in zip(cache.layers, windows):
        if window and not isinstance(layer, WindowedKVCache):
            WindowedKVCache.adopt(layer, window)
