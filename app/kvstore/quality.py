"""Perplexity of the model reading a text through a cache stored with a given scheme.

`perplexity(lm, tokens, scheme)` feeds `tokens` in `chunk`-sized pieces (one
forward pass per chunk) through `SealingKVCache`, which behaves like the live
cache: whenever a `block`-token block is complete, its full-precision working
copy is replaced by `scheme.decode(scheme.encode(block))`; the newest,
unfinished block stays in full precision. Sealing happens inside
`update_and_fetch`, so the chunk that completes a block already attends to the
quantized block (its own keys included) — the stricter of the two choices.
Every next-token prediction (all but the first token) is scored.
"""

from __future__ import annotations

import math

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from app.kvstore.schemes import get_scheme


class SealingKVCache(KVCache):
    """An mlx-lm KVCache whose completed blocks go through a storage scheme (None: kept exact)."""

    def __init__(self, scheme=None, block: int = 256):
        super().__init__()
        self.scheme = scheme
        self.block = block
        self.sealed = 0  # tokens in sealed blocks

    def update_and_fetch(self, keys, values):
        super().update_and_fetch(keys, values)
        if self.scheme is not None:
            while self.offset - self.sealed >= self.block:
                a, b = self.sealed, self.sealed + self.block
                kb, vb = self.keys[0, :, a:b, :], self.values[0, :, a:b, :]
                k2, v2 = self.scheme.decode(self.scheme.encode(kb, vb), self.keys.dtype)
                self.keys[0, :, a:b, :] = k2
                self.values[0, :, a:b, :] = v2
                self.sealed = b
        return self.keys_and_values()


def _module(lm):
    return getattr(lm, "model", lm)


def perplexity(lm, tokens: list[int], scheme: str | None, chunk: int = 128, block: int = 256) -> float:
    """exp(mean negative log-likelihood) of tokens[1:] given their prefixes, read `chunk` tokens at a time."""
    if len(tokens) < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    model = _module(lm)
    sch = None if scheme is None else get_scheme(scheme)
    cache = [SealingKVCache(sch, block) for _ in range(len(model.layers))]
    ids = mx.array(tokens, dtype=mx.int32)
    total = 0.0
    count = 0
    n = len(tokens) - 1  # positions that predict something
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        logits = model(ids[None, start:end], cache=cache)[0].astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        target = ids[start + 1 : end + 1]
        nll = -mx.take_along_axis(logp, target[:, None], axis=-1).sum()
        total += nll.item()
        count += end - start
    return math.exp(total / count)
