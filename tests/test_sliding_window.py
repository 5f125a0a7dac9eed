"""Gemma 3's local (sliding-window) layers keep only the blocks their window needs, and stay exact.

The tiny gemma3 has a window of 8 tokens, one global layer in three; blocks are 256 tokens. A windowed
conversation must give the logits of the same conversation over full caches (same scheme, same
sealing), through prefill, decode, an edit that cuts back into dropped blocks, a prefix copy, and a
save and restore from disk.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from app.kvstore.live_cache import BLOCK_TOKENS
from app.kvstore.window import WindowedKVCache
from app.model.tiny_zoo import SLIDING_WINDOW, build_tiny_arch

HISTORY = [5 + (i * 13) % 300 for i in range(700)]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    from app.model.loader import load_model

    return load_model(str(build_tiny_arch(tmp_path_factory.mktemp("g3") / "gemma3", "gemma3", "q4g64")))


def run(lm, cache, ids, windows: bool = True):
    """The engine's prefill (chunks of 128) of `ids`, then logits of 3 teacher-forced decode steps."""
    from app.engine import generation

    if not windows:  # the full-cache twin: what Parley did before windowing
        generation_windows = generation.sliding_windows
        generation.sliding_windows = lambda model: [None] * len(model.layers)
    try:
        logits = None
        for step in generation.prefill(lm.model, cache, ids, chunk=128):
            logits = step.logits
        out = [np.array(logits[0])]
        for t in (7, 8, 9):
            out.append(np.array(lm.model(mx.array([[t]]), cache=cache.layers)[0, -1]))
            cache.appended([t])
        return out
    finally:
        if not windows:
            generation.sliding_windows = generation_windows


def close(a, b) -> None:
    for x, y in zip(a, b):
        assert np.abs(x - y).max() <= 2e-5 * np.abs(y).max() + 1e-6


def empty(lm):
    from app.kvstore.conversation_cache import ConversationCache
    from app.kvstore.schemes import get_scheme

    return ConversationCache.empty(lm.n_layers, get_scheme("q4"), lm.fingerprint)


def test_local_layers_hold_only_their_window(gemma):
    windowed, full = empty(gemma), empty(gemma)
    close(run(gemma, windowed, HISTORY), run(gemma, full, HISTORY, windows=False))
    n = len(HISTORY) + 3
    local = [layer for layer in windowed.layers if isinstance(layer, WindowedKVCache)]
    assert len(local) == 2 and not isinstance(windowed.layers[2], WindowedKVCache)  # pattern: local, local, global
    for layer in local:
        held = layer.offset - layer.base
        assert held < SLIDING_WINDOW + 2 * BLOCK_TOKENS and layer.base >= BLOCK_TOKENS
        assert layer.keys.shape[2] < full.layers[0].keys.shape[2]
    assert windowed.layers[2].offset == n
    assert windowed.nbytes < full.nbytes


def test_edit_back_into_dropped_blocks_is_exact(gemma):
    windowed, full = empty(gemma), empty(gemma)
    run(gemma, windowed, HISTORY)
    run(gemma, full, HISTORY, windows=False)
    for cache in (windowed, full):
        cache.trim_to(300)  # the local layers had dropped block 0; the next query needs tokens from 293 on
    assert windowed.layers[0].base == 0 or windowed.layers[0].base <= 300 - SLIDING_WINDOW
    more = [11, 12, 13, 14]
    close(run(gemma, windowed, more), run(gemma, full, more, windows=False))
    a, b = windowed.copy_prefix(270), full.copy_prefix(270)
    close(run(gemma, a, more), run(gemma, b, more, windows=False))


def test_saved_and_restored_windowed_cache_continues_exactly(gemma, tmp_path):
    from app.bench.common import make_pool

    pool = make_pool(gemma, tmp_path / "home", "q4")
    live = empty(gemma)
    run(gemma, live, HISTORY)
    pool.save("conv", live, None, "p")
    restored = pool.load("conv")
    assert restored.tokens == live.tokens
    more = [21, 22, 23]
    ours, theirs = run(gemma, restored, more), run(gemma, live, more)
    for x, y in zip(ours, theirs):
        assert np.array_equal(x, y)
