"""Compact caches: sealed blocks kept only encoded, the decode step attending over them in C.

Checked on the tiny model (GQA) against the same cache in its full fp32 form (`PARLEY_KV_COMPACT=0`,
what Parley did before): same keys and values position by position (bitwise), decode logits within
fp32 rounding and the same greedy tokens; a restored compact cache decodes nothing and continues
bitwise like the live one; trims into sealed blocks, prefix copies and the fall back to the full
form (a one-token step through `update_and_fetch`) keep the values.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from app.kvstore import block_attention
from app.kvstore.live_cache import BLOCK_TOKENS
from app.model.loader import load_model
from tests.kv_helpers import fill, greedy_steps, make_pool, tokens

pytestmark = pytest.mark.skipif(block_attention.kernels() is None, reason="no C compiler / PARLEY_CPU_KERNELS=0")


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def full_twin(lm, pool, ids, monkeypatch):
    """The same conversation in full fp32 working copies (the pre-compact cache)."""
    monkeypatch.setenv("PARLEY_KV_COMPACT", "0")
    try:
        cache = fill(lm, pool, ids)
    finally:
        monkeypatch.delenv("PARLEY_KV_COMPACT")
    assert not any(layer.compact for layer in cache.layers)
    return cache


def decode(lm, cache, first: int, steps: int) -> tuple[list[np.ndarray], list[int]]:
    """`steps` one-token greedy steps from `first`: logits of each and the tokens chosen."""
    return greedy_steps(lm, cache, first, steps)


def assert_same_values(a, b, exact: bool = True):
    for la, lb in zip(a.layers, b.layers):
        assert la.offset == lb.offset
        for x, y in zip(la.span(0, la.offset), lb.span(0, lb.offset)):
            if exact:
                assert np.array_equal(np.array(x), np.array(y))
            else:
                np.testing.assert_allclose(np.array(x), np.array(y), rtol=1e-4, atol=1e-4)


def test_live_compact_cache_keeps_no_fp32_copy_of_sealed_blocks(lm, monkeypatch):
    pool = make_pool(lm)
    ids = tokens(700)
    cache = fill(lm, pool, ids)
    for layer in cache.layers:
        assert layer.compact and layer.base == 2 * BLOCK_TOKENS == layer.sealed_tokens
        assert layer.keys.shape[2] < BLOCK_TOKENS + layer.step  # the tail only
    full = full_twin(lm, pool, ids, monkeypatch)
    assert_same_values(cache, full)
    assert cache.nbytes < full.nbytes / 2


def test_decode_over_encoded_blocks_matches_the_full_working_copy(lm, monkeypatch):
    """Greedy tokens identical, logits within fp32 rounding, across a block boundary (sealed mid-decode)."""
    pool = make_pool(lm)
    ids = tokens(500)
    compact, full = fill(lm, pool, ids), full_twin(lm, pool, ids, monkeypatch)
    got, got_tokens = decode(lm, compact, 7, 20)  # 500 + 20 crosses 512: a block seals during decode
    want, want_tokens = decode(lm, full, 7, 20)
    assert got_tokens == want_tokens
    for x, y in zip(got, want):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)
    assert compact.n_sealed == 2 and all(layer.compact for layer in compact.layers)
    assert_same_values(compact, full, exact=False)  # later layers' keys carry the attention's rounding


def test_restored_compact_cache_decodes_nothing_and_continues_exactly(lm):
    pool = make_pool(lm)
    live = fill(lm, pool, tokens(700))
    pool.save("conv:1", live, None, "p")
    restored = pool.load("conv:1")
    for layer in restored.layers:
        assert layer.compact and layer.base == layer.sealed_tokens == 512 and layer.keys.shape[2] < 512
    ours, _ = decode(lm, restored, 11, 6)
    theirs, _ = decode(lm, live, 11, 6)
    for x, y in zip(ours, theirs):
        assert np.array_equal(x, y)


def test_trim_into_sealed_blocks_then_continue(lm, monkeypatch):
    pool = make_pool(lm)
    ids = tokens(700)
    compact, full = fill(lm, pool, ids), full_twin(lm, pool, ids, monkeypatch)
    for cache in (compact, full):
        cache.trim_to(300)
    assert compact.n_sealed == 1 and compact.layers[0].base == 256
    assert_same_values(compact, full)
    more = tokens(250, seed=4)  # a prefill chunk that seals again
    for cache in (compact, full):
        mx.eval(lm.model(mx.array([more]), cache=cache.layers))
        cache.appended(more)
    assert_same_values(compact, full)
    got, _ = decode(lm, compact, 5, 4)
    want, _ = decode(lm, full, 5, 4)
    for x, y in zip(got, want):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)


def test_prefix_copy_of_a_compact_cache(lm, monkeypatch):
    pool = make_pool(lm)
    ids = tokens(700)
    compact, full = fill(lm, pool, ids), full_twin(lm, pool, ids, monkeypatch)
    assert_same_values(compact.copy_prefix(300), full.copy_prefix(300))
    assert_same_values(compact.copy_prefix(100), full.copy_prefix(100))
    for copy in (compact.copy_prefix(256), full.copy_prefix(256)):  # whole blocks, fewer than sealed: no tail
        assert copy.n_tokens == 256 and copy.n_sealed == 1
    assert_same_values(compact.copy_prefix(256), full.copy_prefix(256))


def test_a_one_token_update_elsewhere_turns_the_cache_full_with_the_same_values(lm, monkeypatch):
    """Attention that is not the CPU fast path's (other architectures, the batched engine) gets the full
    keys: the cache decodes its blocks back once and stays full."""
    pool = make_pool(lm)
    ids = tokens(600)
    compact, full = fill(lm, pool, ids), full_twin(lm, pool, ids, monkeypatch)
    layer = compact.layers[0]
    k = mx.ones((1, layer.keys.shape[1], 1, layer.keys.shape[3]))
    keys, values = layer.update_and_fetch(k, k)
    assert not layer.compact and layer.base == 0 and keys.shape[2] == 601
    fk, fv = full.layers[0].update_and_fetch(k, k)
    assert np.array_equal(np.array(keys), np.array(fk)) and np.array_equal(np.array(values), np.array(fv))


def test_encoded_bytes_are_what_an_active_compact_conversation_holds(lm):
    pool = make_pool(lm)
    cache = fill(lm, pool, tokens(1100))
    tail = sum(layer.nbytes for layer in cache.layers)
    one_block_fp32 = 2 * 4 * BLOCK_TOKENS * sum(layer.keys.shape[1] * layer.keys.shape[3] for layer in cache.layers)
    assert cache.nbytes == cache.encoded_nbytes + tail
    assert tail <= one_block_fp32 * 2  # the tail buffer: under a block plus KVCache's growth step
