"""Sliding-window layers (Gemma 3's local layers) keep only the blocks their window still needs.

A local layer's query at position p attends to keys in (p - window, p]. Its
`WindowedKVCache` is a `SealingKVCache` whose full-precision working copy
starts at `base`, a block boundary below the oldest key the next query can
see: older whole blocks leave the working copy (the dominant RAM: fp32) as
soon as they are sealed and out of reach. Their encoded blocks stay only
`RETAIN_TOKENS` behind the working copy (what an edit or a regenerate that
cuts back decodes again); older ones become None in `sealed` (indices stay
those of the conversation's blocks), so a long conversation's local layers
hold a constant amount in RAM. On disk (`app.kvstore.pool`), a windowed
model's block files hold the global layers only, and the local layers' kept
blocks travel in the conversation's tail file (`window_arrays`,
`restore_window_layer`). A cut or prefix copy that would need a dropped
block is refused (`can_cut_to`): the caller starts that cache afresh. The
attention mask (`make_mask`) covers the kept keys only, with the window.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from app.kvstore.live_cache import BLOCK_TOKENS, SealingKVCache

RETAIN_TOKENS = 1024  # encoded blocks kept behind a local layer's window: an edit/regenerate cutting back this far stays exact


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
        layer._forget_old()
        return layer

    @property
    def kept_from(self) -> int:
        """Index of the oldest sealed block still held encoded (older ones were dropped)."""
        return next((i for i, b in enumerate(self.sealed) if b is not None), len(self.sealed))

    def _forget_old(self) -> None:
        """Drop the encoded blocks that end more than RETAIN_TOKENS below the working copy."""
        for i in range(min(max(0, self.base - RETAIN_TOKENS) // self.block_tokens, len(self.sealed))):
            self.sealed[i] = None

    def _base_for(self, n: int) -> int:
        """Where the working copy of a cache of n tokens starts (as `_next_base` would put it, from scratch)."""
        need = min(n - self.window + 1, n // self.block_tokens * self.block_tokens)
        return max(0, need) // self.block_tokens * self.block_tokens

    def can_cut_to(self, n: int) -> bool:
        """Can this layer become exactly the layer of the first n tokens (every block it needs still held)?"""
        want = max(0, n - self.window + 1) // self.block_tokens * self.block_tokens
        return n == 0 or want >= self.base or want // self.block_tokens >= self.kept_from

    def prefix_copy(self, n: int) -> "WindowedKVCache | None":
        """A new windowed layer holding the first n tokens, or None when a block it needs was dropped."""
        nb = n // self.block_tokens
        first = self._base_for(n) // self.block_tokens
        in_copy = nb * self.block_tokens < min(n, self.base)  # the tail's block comes out of the encoded blocks
        lowest = first if first < nb else (nb if in_copy else None)
        if lowest is not None and lowest < self.kept_from:
            return None
        tail = self.span(nb * self.block_tokens, n) if self.keys is not None and n > nb * self.block_tokens else (None, None)
        dtype = self.keys.dtype if self.keys is not None else mx.float32
        return restore_window_layer(self.scheme, self.window, self.sealed[:nb], *tail, dtype, self.block_tokens)

    def reset(self) -> None:
        """Back to an empty layer (a cut below what the layer still holds: the caller prefills afresh)."""
        self.keys = self.values = None
        self.offset = self.base = 0
        self.sealed = []

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
        self._forget_old()

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


def restore_window_layer(scheme, window: int, sealed: list, tail_k, tail_v, dtype,
                         block_tokens: int = BLOCK_TOKENS) -> WindowedKVCache:
    """A local layer rebuilt from its encoded blocks (None where dropped) and its full-precision tail ((H, T, D)).

    The working copy starts where the live layer's would (`_base_for`); a dropped block at or after that point
    means the stored layer cannot give the live logits: ValueError (the pool then rebuilds the cache).
    """
    nb = len(sealed)
    t = tail_k.shape[1] if tail_k is not None else 0
    probe = WindowedKVCache(scheme, block_tokens)
    probe.window = window
    base = probe._base_for(nb * block_tokens + t)
    first = base // block_tokens
    if any(b is None for b in sealed[first:]):
        raise ValueError(f"a sliding-window layer lacks a block inside its window (block {first} on)")
    layer = SealingKVCache.restore(scheme, list(sealed[first:]), tail_k, tail_v, dtype, block_tokens)
    layer.__class__ = WindowedKVCache
    layer.window, layer.base = window, base
    layer.offset += base
    layer.sealed = list(sealed)
    layer._forget_old()
    return layer


def can_cut_to(layer, n: int) -> bool:
    """Can `layer` (windowed or not) be cut back to exactly n tokens?"""
    return not isinstance(layer, WindowedKVCache) or layer.can_cut_to(n)


def window_arrays(layers: list, local: list[int]) -> tuple[dict[str, mx.array], int]:
    """The local layers' kept encoded blocks for the tail file: name -> [len(local), blocks, ...] with the
    index of the first kept block (all local layers keep the same ones; no arrays when none is kept)."""
    n_sealed = len(layers[local[0]].sealed) if local else 0
    kept_from = max((layers[i].kept_from for i in local if isinstance(layers[i], WindowedKVCache)), default=0)
    if kept_from >= n_sealed:
        return {}, n_sealed
    names = layers[local[0]].sealed[kept_from].keys()
    return {f"w.{name}": mx.stack([mx.stack([layers[i].sealed[b][name] for b in range(kept_from, n_sealed)])
                                   for i in local]) for name in names}, kept_from


def window_blocks(host: dict, local: list[int], kept_from: int, n_sealed: int) -> dict[int, list]:
    """Per local layer index, its sealed blocks as the cache keeps them (None before `kept_from`), from a tail
    file's `w.*` tensors (`HostTensor`s); ValueError when their shapes do not fit."""
    names = [n for n in host if n.startswith("w.")]
    n_kept = n_sealed - kept_from
    if not 0 <= kept_from <= n_sealed or bool(names) != (n_kept > 0) or any(
            host[n].data.shape[:2] != (len(local), n_kept) for n in names):
        raise ValueError("the sliding-window blocks in the tail file do not fit its chain")
    out = {}
    for j, i in enumerate(local):
        kept = [{n[2:]: mx.array(host[n].data[j, b]).view(host[n].dtype) if host[n].dtype == mx.bfloat16
                 else mx.array(host[n].data[j, b]) for n in names} for b in range(n_kept)]
        out[i] = [None] * kept_from + kept
    return out


def apply_windows(cache, windows: list[int | None]) -> None:
    """Make the sliding-window layers of a `ConversationCache` windowed (once; nothing to do without windows)."""
    for layer, window in zip(cache.layers, windows):
        if window and not isinstance(layer, WindowedKVCache):
            WindowedKVCache.adopt(layer, window)


def global_layers(windows: list[int | None]) -> list[int]:
    """Indices of the layers without a window (what a windowed model's block files hold)."""
    return [i for i, w in enumerate(windows) if not w]


def local_layers(windows: list[int | None]) -> list[int]:
    return [i for i, w in enumerate(windows) if w]


def layer_list(windows: list[int | None]) -> str:
    """What a windowed model's cache files record (and are checked for): the layers each block holds."""
    return "global:" + ",".join(map(str, global_layers(windows)))


def restore_windowed(pool, row, hashes: list[str], shared: dict) -> tuple[list[SealingKVCache], list[int]]:
    """`BlockPool._restore` for a model with sliding-window layers.

    Block files hold the global layers (stacked in `global_layers` order); the tail file holds every
    layer's unsealed tail plus the local layers' kept blocks (`window_arrays`, from block `window_from`
    on). Everything is verified as for any cache (checksums, chain, token counts, shapes): a mismatch
    raises BadCacheFile or ValueError and the pool rebuilds the cache. Decoding is per layer (MLX).
    """
    from functools import partial

    from app.kvstore.blockfile import BadCacheFile, chain_root, read_cache_file
    from app.kvstore.host_block import layer_blocks

    glob, local = global_layers(pool.windows), local_layers(pool.windows)
    parent = chain_root(pool.fingerprint, pool.scheme_id)
    per_layer: list[list] = [[] for _ in range(pool.n_layers)]
    tokens: list[int] = []
    for n, h in enumerate(hashes):
        if h in shared:
            block, block_tokens = shared[h]
        else:
            try:
                host, block_tokens = pool.read_block(h, parent)
                if any(t.data.shape[:1] != (len(glob),) for t in host.values()):
                    raise BadCacheFile(f"block {h[:12]} does not hold {len(glob)} layers")
            except BadCacheFile:
                # the rest of the chain goes too: files written before windowing (every layer) come in whole
                # chains, and a kept one would be taken as stored by the next save, failing every load again
                for later in hashes[n:]:
                    pool.drop_block(later)
                raise
            block = [None] * pool.n_layers
            for j, b in zip(glob, layer_blocks(host, len(glob))):
                block[j] = b
            shared[h] = (block, block_tokens)
        for i in glob:
            per_layer[i].append(block[i])
        tokens += block_tokens
        parent = h
    tail = read_cache_file(pool.tail_path(row.tail_file),
                           {**pool.expected_header(), "kind": "tail", "key": row.key, "parent": parent})
    tokens += tail.tokens
    if len(tokens) != row.tokens:
        raise BadCacheFile(f"it holds {len(tokens)} tokens, the catalog says {row.tokens}")
    try:
        kept_from = int(tail.meta.get("window_from", ""))
    except ValueError:
        raise BadCacheFile(f"{row.tail_file} does not say which sliding-window blocks it holds") from None
    kept = window_blocks(tail.host, local, kept_from, len(hashes))
    tk, tv = tail.host["k"], tail.host["v"]
    if tk.data.shape[:1] != (pool.n_layers,) or tv.data.shape[:1] != (pool.n_layers,):
        raise ValueError(f"the tail holds {tk.data.shape[0]} layers, the model has {pool.n_layers}")
    layers = []
    for i, window in enumerate(pool.windows):
        k, v = tk.to_mx(i), tv.to_mx(i)
        if window:
            layers.append(restore_window_layer(pool.scheme, window, kept[i], k, v, pool.dtype))
        else:
            layers.append(SealingKVCache.restore(pool.scheme, per_layer[i], k, v, pool.dtype))
    mx.eval([x for layer in layers for x in (layer.keys, layer.values) if x is not None])
    if any(layer.offset != len(tokens) for layer in layers):
        raise BadCacheFile(f"its arrays do not hold the {len(tokens)} tokens of its token ids")
    return layers, tokens
