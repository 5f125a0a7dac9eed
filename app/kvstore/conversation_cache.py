"""A conversation's whole KV state: exact token ids plus one sealing cache per layer.

The engine compares `tokens` with each new prompt to reuse the longest common
prefix; the store addresses sealed blocks by a hash chain over these tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from app.kvstore.blockfile import chain_next, chain_root, scheme_id
from app.kvstore.live_cache import BLOCK_TOKENS, SealingKVCache
from app.kvstore.window import WindowedKVCache, can_cut_to


@dataclass
class ConversationCache:
    layers: list[SealingKVCache]
    fingerprint: str
    scheme_id: str
    tokens: list[int] = field(default_factory=list)
    _hashes: list[str] = field(default_factory=list)

    @classmethod
    def empty(cls, n_layers: int, scheme, fingerprint: str) -> "ConversationCache":
        return cls([SealingKVCache(scheme) for _ in range(n_layers)], fingerprint, scheme_id(scheme))

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_sealed(self) -> int:
        return len(self.layers[0].sealed) if self.layers else 0

    def appended(self, token_ids: list[int]) -> None:
        """Record tokens the model has just been fed through `self.layers`."""
        self.tokens.extend(token_ids)
        assert self.layers[0].offset == len(self.tokens), "cache and token list out of step"

    def trim_to(self, n: int) -> int:
        """Keep only the first `n` tokens (an edit, a regenerate, a re-rendered turn); return the tokens kept.

        That is `n`, or 0 when a sliding-window layer no longer holds the blocks a cache of n tokens
        needs (`app.kvstore.window`): then the cache starts afresh and the caller prefills everything.
        """
        drop = len(self.tokens) - n
        if drop <= 0:
            return len(self.tokens)
        if not all(can_cut_to(layer, n) for layer in self.layers):
            for layer in self.layers:
                if isinstance(layer, WindowedKVCache):
                    layer.reset()
                else:
                    layer.trim(layer.offset)
            self.tokens.clear()
            self._hashes.clear()
            return 0
        for layer in self.layers:
            layer.trim(drop)
        del self.tokens[n:]
        del self._hashes[self.n_sealed :]
        return n

    def block_hashes(self) -> list[str]:
        """Chain hash of every sealed block, computed incrementally."""
        parent = self._hashes[-1] if self._hashes else chain_root(self.fingerprint, self.scheme_id)
        for i in range(len(self._hashes), self.n_sealed):
            parent = chain_next(parent, self.tokens[i * BLOCK_TOKENS : (i + 1) * BLOCK_TOKENS])
            self._hashes.append(parent)
        return list(self._hashes)

    def block_arrays(self, index: int, layers: list[int] | None = None) -> dict[str, mx.array]:
        """Encoded block `index` of every layer (or of the `layers` given: a windowed model's global ones),
        stacked on axis 0 (the file layout)."""
        chosen = self.layers if layers is None else [self.layers[i] for i in layers]
        names = chosen[0].sealed[index].keys()
        return {name: mx.stack([layer.sealed[index][name] for layer in chosen]) for name in names}

    def tail_arrays(self) -> dict[str, mx.array]:
        """The unsealed tail of every layer; fp32 tails hold fp16-exact values and are stored as fp16."""
        SealingKVCache.round_tails_to_fp16(self.layers)
        tails = [layer.tail() for layer in self.layers]
        k, v = mx.stack([k for k, _ in tails]), mx.stack([v for _, v in tails])
        if k.dtype == mx.float32:
            k, v = k.astype(mx.float16), v.astype(mx.float16)
        return {"k": k, "v": v}

    @property
    def tail_tokens(self) -> list[int]:
        return self.tokens[self.n_sealed * BLOCK_TOKENS :]

    @property
    def nbytes(self) -> int:
        """RAM held: the full-precision working copy plus the encoded blocks."""
        return sum(layer.nbytes + layer.encoded_nbytes for layer in self.layers)

    @property
    def encoded_nbytes(self) -> int:
        return sum(layer.encoded_nbytes for layer in self.layers)

    @property
    def working_nbytes(self) -> int:
        """Bytes of the full-precision working copies: compact caches hold only the unsealed tail there (with
        its room to grow, at most one block), the full form every position."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def fp32_block_nbytes(self) -> int:
        """One block of keys and values in fp32 over every layer: what an unsealed tail holds at most.
        The issue's RAM bound for an active conversation is 1.3 x `encoded_nbytes` + this."""
        total = 0
        for layer in self.layers:
            if layer.keys is not None:
                heads, dk, dv = layer.keys.shape[1], layer.keys.shape[3], layer.values.shape[3]
                total += 4 * layer.block_tokens * heads * (dk + dv)
        return total

    @property
    def sealed_rows_in_working_copy(self) -> int:
        """Positions of sealed blocks that the working copies also hold in full precision, summed over layers:
        0 for compact caches (their sealed blocks live only encoded), the sealed tokens per layer otherwise."""
        return sum(max(0, min(layer.sealed_tokens, layer.offset) - layer.base)
                   for layer in self.layers if layer.keys is not None)

    def copy_prefix(self, n: int) -> "ConversationCache":
        """A new cache holding the first `n` tokens (used to snapshot a persona's preamble); empty when a
        sliding-window layer no longer holds the blocks those n tokens need (see `trim_to`)."""
        sealed_blocks = n // BLOCK_TOKENS
        layers = []
        for layer in self.layers:
            if isinstance(layer, WindowedKVCache):
                copy = layer.prefix_copy(n)
                if copy is None:
                    return ConversationCache.empty(len(self.layers), layer.scheme, self.fingerprint)
                layers.append(copy)
                continue
            start = sealed_blocks * BLOCK_TOKENS
            tail_k, tail_v = layer.span(start, n) if layer.keys is not None and n > start else (None, None)
            dtype = layer.keys.dtype if layer.keys is not None else mx.float32
            layers.append(SealingKVCache.restore(layer.scheme, layer.sealed[:sealed_blocks], tail_k, tail_v, dtype))
        return ConversationCache(layers, self.fingerprint, self.scheme_id, self.tokens[:n], self._hashes[:sealed_blocks])
