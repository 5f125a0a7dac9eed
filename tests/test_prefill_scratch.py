"""Prefill chunks over compact caches: the sealed blocks decoded into one shared scratch (app.kvstore.prefill_scratch).

Checked on the tiny model (GQA: 4 query heads over 2 KV heads) against the path it replaces (each chunk
decoding every sealed block into fresh arrays, then concatenating the tail): the same logits and the same
cache contents bit for bit, over block boundaries (a block sealed in the middle of a chunk), partial and
empty tails, every scheme the kernel reads, and restored caches against live ones. Also: a prefill chunk
decodes no fresh copy of the blocks, and the scratch is freed when the prefill ends.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from app.engine.generation import prefill
from app.kvstore import block_attention, prefill_scratch
from app.kvstore.live_cache import BLOCK_TOKENS, SealingKVCache
from app.model.loader import load_model
from tests.kv_helpers import fill, make_pool, tokens

pytestmark = pytest.mark.skipif(block_attention.kernels() is None, reason="no C compiler / PARLEY_CPU_KERNELS=0")


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def old_path(monkeypatch) -> None:
    """What a prefill chunk over a compact cache did before: `update_and_fetch`'s freshly decoded blocks."""
    monkeypatch.delattr(SealingKVCache, "update_and_fetch_shared")


def chunk_logits(lm, cache, ids: list[int]) -> np.ndarray:
    out = lm.model(mx.array([ids]), cache=cache.layers)
    mx.eval(out)
    cache.appended(ids)
    return np.array(out)


def assert_same_cache(a, b) -> None:
    for la, lb in zip(a.layers, b.layers):
        assert la.compact and lb.compact and la.offset == lb.offset and len(la.sealed) == len(lb.sealed)
        for x, y in zip(la.span(0, la.offset), lb.span(0, lb.offset)):
            assert np.array_equal(np.array(x), np.array(y))


@pytest.mark.parametrize("scheme", ["q4", "k8v4", "q8", "f16"])
@pytest.mark.parametrize("before, chunk", [(300, 100), (450, 200), (512, 37), (256, 256), (700, 1)])
def test_prefill_chunk_over_shared_scratch_is_bitwise_the_old_path(lm, monkeypatch, scheme, before, chunk):
    """(450, 200): a block seals inside the chunk; (512, 37): the tail was empty; (256, 256): the chunk
    fills its block exactly; (700, 1) a one-token step (the C decode attention, not this path)."""
    pool = make_pool(lm, scheme)
    ids, more = tokens(before), tokens(chunk, seed=3)
    new = fill(lm, pool, ids)
    assert all(layer.compact for layer in new.layers), "the scheme is one the kernel reads"
    got = chunk_logits(lm, new, more)
    with monkeypatch.context() as m:
        old_path(m)
        old = fill(lm, pool, ids)
        want = chunk_logits(lm, old, more)
    assert np.array_equal(got, want)
    assert_same_cache(new, old)
    assert new.n_sealed == (before + chunk) // BLOCK_TOKENS


def test_engine_prefill_in_chunks_matches_the_old_path(lm, monkeypatch):
    """The engine's chunked prefill (several chunks, blocks sealed between and inside them) then decode steps."""
    pool = make_pool(lm)
    ids = tokens(900, seed=5)
    got = _prefill_then_decode(lm, pool, ids)
    with monkeypatch.context() as m:
        old_path(m)
        want = _prefill_then_decode(lm, pool, ids)
    for x, y in zip(got, want):
        assert np.array_equal(x, y)


def _prefill_then_decode(lm, pool, ids: list[int]) -> list[np.ndarray]:
    cache = fill(lm, pool, ids[:100])
    out = [np.array(step.logits) for step in prefill(lm.model, cache, ids[100:], chunk=160) if step.logits is not None]
    for t in (7, 9, 11):
        logits = lm.model(mx.array([[t]]), cache=cache.layers)[0, -1]
        mx.eval(logits)
        cache.appended([t])
        out.append(np.array(logits))
    return out


def test_restored_cache_prefills_exactly_like_the_live_one(lm):
    pool = make_pool(lm)
    live = fill(lm, pool, tokens(700))
    pool.save("conv:1", live, None, "p")
    restored = pool.load("conv:1")
    more = tokens(90, seed=8)  # crosses the 768 boundary: a block seals inside the chunk
    assert np.array_equal(chunk_logits(lm, restored, more), chunk_logits(lm, live, more))
    assert_same_cache(restored, live)


def test_a_prefill_chunk_decodes_no_fresh_copy_of_the_blocks(lm, monkeypatch):
    pool = make_pool(lm)
    cache = fill(lm, pool, tokens(600))

    def no_fresh_copy(self, first, last):
        raise AssertionError("a prefill chunk decoded the blocks into fresh arrays")

    monkeypatch.setattr(SealingKVCache, "_decoded", no_fresh_copy)
    chunk_logits(lm, cache, tokens(50, seed=2))
    assert all(layer.compact for layer in cache.layers)


def test_the_scratch_is_freed_when_the_prefill_ends(lm):
    pool = make_pool(lm)
    cache = fill(lm, pool, tokens(600))
    prefill_scratch.release()
    steps = prefill(lm.model, cache, tokens(300, seed=6), chunk=128)
    next(steps)
    layer = cache.layers[0]
    one_layer = 2 * 4 * layer.keys.shape[1] * layer.keys.shape[3] * cache.n_tokens
    assert one_layer <= prefill_scratch.held_bytes() <= 2 * 4 * layer.keys.shape[1] * layer.keys.shape[3] * 2048
    for _ in steps:
        pass
    assert prefill_scratch.held_bytes() == 0


def test_a_windowed_layer_keeps_its_own_update(lm):
    """Sliding-window layers (never compact) slide their working copy in their own `update_and_fetch`: the
    shared-scratch entry point must go through it, not around it."""
    from app.kvstore.window import WindowedKVCache

    pool = make_pool(lm)
    ids = tokens(600)
    a, b = (WindowedKVCache.adopt(fill(lm, pool, ids).layers[0], 300) for _ in range(2))
    rng = np.random.default_rng(0)
    for n in (250, 40):  # the second update slides the window past another block
        k = mx.array(rng.standard_normal((1, a.keys.shape[1], n, a.keys.shape[3])).astype(np.float32))
        got, want = a.update_and_fetch_shared(k, k), b.update_and_fetch(k, k)
    assert a.base == b.base == 512
    for x, y in zip(got, want):
        assert np.array_equal(np.array(x), np.array(y))
