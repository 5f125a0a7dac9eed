"""The decode kernels on more threads (app/csrc/threads.c) give the very same model outputs.

The tiny model's decode step over a compact cache (sealed 4-bit blocks attended in C, the 4-bit gemv)
with every kernel job threaded (the size threshold set to 0) against the calling thread alone: the
logits and greedy tokens are bitwise the same, and the pool really shared the jobs.
"""

from __future__ import annotations

import numpy as np
import pytest

from app.kvstore import block_attention
from app.model import cpu_kernels
from app.model.loader import load_model
from tests.kv_helpers import fill, greedy_steps, make_pool, tokens

pytestmark = pytest.mark.skipif(block_attention.kernels() is None, reason="no C compiler / PARLEY_CPU_KERNELS=0")


def decode_logits(lm, pool, ids: list[int], steps: int) -> list[np.ndarray]:
    """Prefill `ids` into a compact cache, then `steps` greedy one-token steps: each step's logits."""
    cache = fill(lm, pool, ids)
    assert all(layer.compact and layer.sealed_tokens for layer in cache.layers)
    return greedy_steps(lm, cache, 7, steps)[0]


def test_one_and_two_threads_give_identical_decode_logits(tiny_model_dir):
    lm = load_model(str(tiny_model_dir))
    ids = tokens(600)
    before, work = cpu_kernels.threads(), cpu_kernels.set_min_work(0)
    try:
        cpu_kernels.set_threads(1)
        alone = decode_logits(lm, make_pool(lm), ids, 12)
        cpu_kernels.set_threads(2)
        stats = cpu_kernels.pool_stats()
        shared = decode_logits(lm, make_pool(lm), ids, 12)
        after = cpu_kernels.pool_stats()
    finally:
        cpu_kernels.set_threads(before)
        cpu_kernels.set_min_work(work)
    assert after["shared"] + after["alone"] > stats["shared"] + stats["alone"]  # the jobs went to the pool
    for a, b in zip(alone, shared):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
