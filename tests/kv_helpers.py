"""Shared helpers for the kvstore and engine tests (real MLX on the tiny model)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from app import paths
from app.catalog import Catalog
from app.catalog.caches import CacheStore
from app.kvstore.conversation_cache import ConversationCache
from app.kvstore.pool import BlockPool
from app.kvstore.schemes import get_scheme


def make_pool(lm, scheme: str = "q4", fingerprint: str | None = None) -> BlockPool:
    return BlockPool(CacheStore(Catalog()), paths.caches_dir(), fingerprint or lm.fingerprint, get_scheme(scheme), lm.n_layers)


def fill(lm, pool: BlockPool, token_ids: list[int], chunk: int = 128) -> ConversationCache:
    """A cache holding `token_ids`, fed in chunks as the engine would."""
    cache = ConversationCache.empty(lm.n_layers, pool.scheme, pool.fingerprint)
    for i in range(0, len(token_ids), chunk):
        piece = token_ids[i : i + chunk]
        mx.eval(lm.model(mx.array([piece]), cache=cache.layers))
        cache.appended(piece)
    return cache


def next_logits(lm, cache: ConversationCache, token_ids: list[int]) -> mx.array:
    out = lm.model(mx.array([token_ids]), cache=cache.layers)[0, -1]
    mx.eval(out)
    return out


def tokens(n: int, seed: int = 0, vocab: int = 300) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def greedy_steps(lm, cache: ConversationCache, first: int, steps: int, check=None) -> tuple[list[np.ndarray], list[int]]:
    """`steps` one-token greedy steps from `first`: the logits of each step and the tokens chosen.
    `check`, if given, sees each step's raw model output ([1, 1, vocab]) first."""
    out, chosen, t = [], [], first
    for _ in range(steps):
        logits = lm.model(mx.array([[t]]), cache=cache.layers)
        if check is not None:
            check(logits)
        logits = logits[0, -1]
        mx.eval(logits)
        cache.appended([t])
        out.append(np.array(logits))
        t = int(np.argmax(out[-1]))
        chosen.append(t)
    return out, chosen
