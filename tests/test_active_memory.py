"""An active conversation's RAM stays within issue 14's bound: 1.3 x its 4-bit bytes + one block of fp32.

On the tiny model, through the engine's own path (`generation.prefill` in chunks, then `generation.decode`), live
after a long prefill and restored from disk. Measured with the cache's own byte accounting and MLX's memory counters
(`mx.get_active_memory`: every MLX array alive), not timings: what the conversation added over the turn. The fp32
working copies hold only the unsealed tail (no sealed block decoded in fp32), the prefill scratch (a layer's sealed
blocks decoded in fp32) is gone when the prefill ends and is not kept in MLX's cache of freed buffers, and a long
prefill makes one scratch, not one per size it grows through. The full form (`PARLEY_KV_COMPACT=0`: an fp32 copy
of every sealed block) is outside the bound, so the check can fail.
"""

from __future__ import annotations

import gc

import mlx.core as mx
import pytest

from app.engine.commands import Sampling
from app.engine.generation import decode, prefill
from app.kvstore import block_attention, prefill_scratch
from app.kvstore.conversation_cache import ConversationCache
from app.model.loader import load_model
from tests.kv_helpers import make_pool, tokens

pytestmark = pytest.mark.skipif(block_attention.kernels() is None, reason="no C compiler / PARLEY_CPU_KERNELS=0")

CONTEXT = 5000  # ~20 sealed blocks: the bound's 30% slack on the 4-bit bytes is well above MLX's small arrays
BOUND_FACTOR = 1.3


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    lm = load_model(str(tiny_model_dir))
    warm = ConversationCache.empty(lm.n_layers, make_pool(lm).scheme, lm.fingerprint)
    a_turn(lm, warm, tokens(700, seed=9))  # fp32 weight copies (long prefill), kernels, tables: the model's, made now
    return lm


@pytest.fixture
def big_mlx_cache():
    """MLX keeps freed buffers up to 1 GB meanwhile (as `Session.open` raises its limit to the cache budget)."""
    previous = mx.set_cache_limit(1 << 30)
    yield
    mx.set_cache_limit(previous)


def a_turn(lm, cache, ids: list[int], steps: int = 8) -> None:
    """The engine's turn: prefill `ids` in chunks, then greedy decode `steps` tokens."""
    logits = None
    for step in prefill(lm.model, cache, ids):
        logits = step.logits
    for _ in decode(lm.model, cache, logits, Sampling(temperature=0.0, max_tokens=steps), set()):
        pass


def active() -> int:
    gc.collect()
    return mx.get_active_memory()


def bound(cache) -> float:
    return BOUND_FACTOR * cache.encoded_nbytes + cache.fp32_block_nbytes


def assert_within_bound(cache, mlx_grown: int, host_bytes: int = 0) -> None:
    """The cache's accounting and what MLX's counters saw added (plus block bytes held outside MLX) within the bound."""
    assert cache.n_sealed >= 16 and cache.encoded_nbytes > 0
    assert prefill_scratch.held_bytes() == 0, "the prefill scratch outlived the prefill"
    assert cache.sealed_rows_in_working_copy == 0, "sealed blocks are also held in fp32"
    assert 0 < cache.working_nbytes <= cache.fp32_block_nbytes, "the fp32 tail is more than one block"
    assert cache.encoded_nbytes + cache.working_nbytes <= bound(cache)
    assert mlx_grown + host_bytes <= bound(cache), (mlx_grown, host_bytes, bound(cache))


def test_a_live_conversation_after_a_long_prefill_and_a_turn(lm, big_mlx_cache):
    pool = make_pool(lm)
    before = active()
    cache = ConversationCache.empty(lm.n_layers, pool.scheme, pool.fingerprint)
    a_turn(lm, cache, tokens(CONTEXT, seed=1))
    assert_within_bound(cache, active() - before)


def test_a_restored_conversation_after_a_turn(lm, big_mlx_cache):
    pool = make_pool(lm)
    live = ConversationCache.empty(lm.n_layers, pool.scheme, pool.fingerprint)
    a_turn(lm, live, tokens(CONTEXT, seed=2))
    pool.save("conv:1", live, None, "p")
    del live
    before = active()
    restored = pool.load("conv:1")
    read = restored.encoded_nbytes  # the block files' bytes, held in host memory (not MLX arrays)
    a_turn(lm, restored, tokens(20, seed=3))
    assert_within_bound(restored, active() - before, read)


def test_the_full_form_is_outside_the_bound(lm, monkeypatch):
    """The check has teeth: a cache that keeps every sealed block in fp32 too (what restore built before compact
    caches) fails it."""
    monkeypatch.setenv("PARLEY_KV_COMPACT", "0")
    pool = make_pool(lm)
    cache = ConversationCache.empty(lm.n_layers, pool.scheme, pool.fingerprint)
    a_turn(lm, cache, tokens(CONTEXT, seed=1))
    assert not cache.layers[0].compact and cache.sealed_rows_in_working_copy > 0
    assert cache.encoded_nbytes + cache.working_nbytes > bound(cache)


def test_the_released_scratch_is_not_kept_in_mlx_cache(lm, big_mlx_cache):
    """The scratch (a layer's sealed blocks in fp32) goes back to the allocator when the prefill ends, not into
    MLX's cache of freed buffers, where it would stay as a dead fp32 copy of the context."""
    pool = make_pool(lm)
    cache = ConversationCache.empty(lm.n_layers, pool.scheme, pool.fingerprint)
    a_turn(lm, cache, tokens(1500, seed=4))
    steps = prefill(lm.model, cache, tokens(300, seed=5), chunk=128)
    next(steps)
    held = prefill_scratch.held_bytes()
    assert held > 0
    cached, alive = mx.get_cache_memory(), active()
    steps.close()  # the prefill ends early (a cancelled turn): its `finally` releases the scratch
    assert prefill_scratch.held_bytes() == 0
    assert mx.get_cache_memory() - cached < held  # what the step's own arrays left there, not the scratch
    assert active() <= alive - held


def test_a_long_prefill_makes_one_scratch(lm):
    """`generation.prefill` reserves the scratch for every position it will attend over: made once, not regrown
    (and an old one left behind) every GROW_TOKENS positions."""
    pool = make_pool(lm)
    cache = ConversationCache.empty(lm.n_layers, pool.scheme, pool.fingerprint)
    a_turn(lm, cache, tokens(600, seed=6))
    sizes = set()
    for _ in prefill(lm.model, cache, tokens(3 * prefill_scratch.GROW_TOKENS, seed=7), chunk=256):
        sizes.add(prefill_scratch.held_bytes())
    sizes.discard(0)  # after the last chunk: released
    layer = cache.layers[0]
    per_position = 4 * layer.keys.shape[1] * (layer.keys.shape[3] + layer.values.shape[3])
    assert len(sizes) == 1 and sizes.pop() >= per_position * cache.n_tokens
