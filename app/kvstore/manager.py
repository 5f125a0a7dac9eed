"""Caches in RAM under a budget: the active one pinned, idle ones compact, LRU to disk.

The conversation on screen is *pinned* and keeps a full-precision working
copy the model attends over. Idle caches are *compact*: only their encoded
(~4.5 bits/element) blocks and the small full-precision tail stay in RAM, so
many more fit. Over budget, the least recently used idle caches are dropped
from RAM (they are on disk since their last turn) and come back on demand.
Blocks shared by several caches (same persona preamble, branches) are held
once and counted once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx

from app.kvstore.blockfile import scheme_id
from app.kvstore.conversation_cache import ConversationCache
from app.kvstore.host_block import block_nbytes, stacked
from app.kvstore.live_cache import BLOCK_TOKENS, SealingKVCache
from app.kvstore.pool import BlockPool, CacheWriteFailed, LoadMiss
from app.kvstore.window import WindowedKVCache, restore_window_layer


@dataclass
class CompactCache:
    """An idle cache: encoded blocks and a full-precision tail, no working copy."""

    tokens: list[int]
    hashes: list[str]
    sealed: list[list[dict]]  # per layer, per block
    tails: list[tuple[mx.array, mx.array]]
    dtype: mx.Dtype
    windows: list[int | None] | None = None  # per layer, its sliding window (None entries in `sealed`: dropped)

    @classmethod
    def of(cls, cache: ConversationCache) -> "CompactCache":
        # exact: fp32 tails are fp16 values from here on, held at half the RAM
        SealingKVCache.round_tails_to_fp16(cache.layers)
        tails = [tuple(mx.contiguous(x.astype(mx.float16) if x.dtype == mx.float32 else x) for x in layer.tail())
                 for layer in cache.layers]
        mx.eval(tails)
        dtype = next((l.keys.dtype for l in cache.layers if l.keys is not None), mx.float32)
        windows = [getattr(l, "window", None) if isinstance(l, WindowedKVCache) else None for l in cache.layers]
        return cls(list(cache.tokens), cache.block_hashes(), [list(l.sealed) for l in cache.layers], tails, dtype,
                   windows if any(windows) else None)

    def expand(self, scheme, fingerprint: str) -> ConversationCache:
        n_blocks = {len(s) for s in self.sealed}
        if self.windows:
            layers = [restore_window_layer(scheme, w, s, tk, tv, self.dtype) if w else
                      SealingKVCache.restore(scheme, s, tk, tv, self.dtype)
                      for w, s, (tk, tv) in zip(self.windows, self.sealed, self.tails)]
        elif len(n_blocks) == 1 and self.sealed:
            # all layers at once, decoded straight into the working copies (C kernels; MLX without them)
            blocks = [stacked([s[b] for s in self.sealed]) for b in range(n_blocks.pop())]
            layers = SealingKVCache.restore_layers(scheme, blocks, self.sealed, [tk for tk, _ in self.tails],
                                                   [tv for _, tv in self.tails], self.dtype)
        else:
            layers = [SealingKVCache.restore(scheme, s, tk, tv, self.dtype) for s, (tk, tv) in zip(self.sealed, self.tails)]
        mx.eval([x for l in layers for x in (l.keys, l.values) if x is not None])
        return ConversationCache(layers, fingerprint, scheme_id(scheme), list(self.tokens), list(self.hashes))

    @property
    def tail_nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.tails)


@dataclass
class Entry:
    cache: ConversationCache | CompactCache
    conversation_id: int | None
    persona_id: str
    dirty: bool = False
    last_used: float = 0.0


class CacheManager:
    def __init__(self, pool: BlockPool, budget_bytes: int):
        self.pool = pool
        self.budget_bytes = int(budget_bytes)
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.pinned: str | None = None

    # -- access ----------------------------------------------------------
    def get(self, key: str) -> tuple[ConversationCache | None, str, LoadMiss | None]:
        """The live cache for `key` and where it came from: "ram", "disk" or "none"."""
        entry = self.entries.get(key)
        if entry is not None:
            self._touch(key)
            if isinstance(entry.cache, CompactCache):
                entry.cache = entry.cache.expand(self.pool.scheme, self.pool.fingerprint)
            return entry.cache, "ram", None
        loaded = self.pool.load(key, shared=self.shared_blocks())
        if isinstance(loaded, ConversationCache):
            row = self.pool.record(key)
            self.entries[key] = Entry(loaded, row.conversation_id, row.persona_id, last_used=time.time())
            return loaded, "disk", None
        return None, "none", loaded if isinstance(loaded, LoadMiss) else None

    def put(self, key: str, cache: ConversationCache, conversation_id: int | None, persona_id: str) -> None:
        self.entries[key] = Entry(cache, conversation_id, persona_id, dirty=True, last_used=time.time())
        self._touch(key)

    def mark_dirty(self, key: str) -> None:
        if key in self.entries:
            self.entries[key].dirty = True

    def save(self, key: str):
        entry = self.entries[key]
        cache = entry.cache
        if isinstance(cache, CompactCache):
            cache = cache.expand(self.pool.scheme, self.pool.fingerprint)
        report = self.pool.save(key, cache, entry.conversation_id, entry.persona_id)
        entry.dirty = False
        return report

    def prefetch(self, key: str) -> str:
        """Bring a stored cache into RAM (compact) ahead of use; return where it is now."""
        if key in self.entries:
            return "ram"
        cache, source, _ = self.get(key)
        if cache is not None and key != self.pinned:
            self.entries[key].cache = CompactCache.of(cache)
        self.enforce_budget()
        return "ram" if key in self.entries else source

    def pin(self, key: str | None) -> None:
        """Make `key` the conversation on screen; the previous one goes compact."""
        previous, self.pinned = self.pinned, key
        if previous and previous != key and previous in self.entries:
            entry = self.entries[previous]
            if isinstance(entry.cache, ConversationCache):
                entry.cache = CompactCache.of(entry.cache)
        self.enforce_budget()

    def compact(self, key: str) -> None:
        """Drop the working copy of an idle cache, keeping its encoded blocks and tail."""
        entry = self.entries.get(key)
        if entry is not None and key != self.pinned and isinstance(entry.cache, ConversationCache):
            entry.cache = CompactCache.of(entry.cache)

    def evict(self, key: str) -> None:
        entry = self.entries.get(key)
        if entry is None:
            return
        if entry.dirty:
            try:
                self.save(key)
            except CacheWriteFailed:
                pass  # disposable: leaving RAM unsaved means the next use rebuilds it from the transcript
        del self.entries[key]

    def discard(self, key: str) -> None:
        """Drop from RAM without saving (a cache out of step with its tokens: the copy on disk is the last good
        one; or a deleted conversation); unpin it if it was on screen."""
        self.entries.pop(key, None)
        if self.pinned == key:
            self.pinned = None

    def forget(self, key: str) -> None:
        """Drop from RAM and disk (a deleted conversation)."""
        self.entries.pop(key, None)
        self.pool.drop(key)

    def enforce_budget(self) -> list[str]:
        """Evict least recently used idle caches until RAM use fits the budget."""
        evicted = []
        for key in list(self.entries):
            if self.ram_bytes() <= self.budget_bytes:
                break
            if key != self.pinned:
                self.evict(key)
                evicted.append(key)
        return evicted

    # -- accounting --------------------------------------------------------
    def ram_bytes(self) -> int:
        seen: set[str] = set()
        total = 0
        for entry in self.entries.values():
            total += self._entry_bytes(entry, seen)
        return total

    def entry_bytes(self, key: str) -> int:
        return self._entry_bytes(self.entries[key], set())

    def _entry_bytes(self, entry: Entry, seen: set[str]) -> int:
        cache = entry.cache
        if isinstance(cache, ConversationCache):
            hashes, sealed = cache.block_hashes(), [l.sealed for l in cache.layers]
            total = sum(l.nbytes for l in cache.layers)  # working copy
        else:
            hashes, sealed = cache.hashes, cache.sealed
            total = cache.tail_nbytes
        for i, h in enumerate(hashes):
            if h not in seen:
                seen.add(h)
                total += sum(block_nbytes(layer[i]) for layer in sealed if layer[i] is not None)
        return total

    def where(self, key: str) -> str:
        if key in self.entries:
            return "ram"
        return "disk" if self.pool.has(key) else "none"

    def _touch(self, key: str) -> None:
        self.entries.move_to_end(key)
        self.entries[key].last_used = time.time()

    def shared_blocks(self) -> dict[str, tuple[list[dict], list[int]]]:
        """Blocks already in RAM (per-layer arrays), so a disk load shares them instead of reading again."""
        shared = {}
        for entry in self.entries.values():
            cache = entry.cache
            hashes = cache.block_hashes() if isinstance(cache, ConversationCache) else cache.hashes
            sealed = [l.sealed for l in cache.layers] if isinstance(cache, ConversationCache) else cache.sealed
            for i, h in enumerate(hashes):
                if h not in shared:
                    shared[h] = ([layer[i] for layer in sealed], cache.tokens[i * BLOCK_TOKENS : (i + 1) * BLOCK_TOKENS])
        return shared
