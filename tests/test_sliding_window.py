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


LONG = [5 + (i * 11) % 300 for i in range(1800)]  # 7 sealed blocks: the local layers drop the oldest ones


def near(a, b) -> None:
    """Windowed vs full caches over LONG: equal within fp32 rounding, which this random model amplifies with
    length (the code before dropping blocks differed just as much: ~1.5e-4 at 1800 tokens, 0 at 700).
    Restores are compared bit for bit with the live windowed cache instead."""
    for x, y in zip(a, b):
        assert np.abs(x - y).max() <= 1e-3 * np.abs(y).max()


def test_long_conversation_local_layers_drop_old_encoded_blocks(gemma):
    from app.kvstore.window import RETAIN_TOKENS

    windowed, full = empty(gemma), empty(gemma)
    near(run(gemma, windowed, LONG), run(gemma, full, LONG, windows=False))
    local = [layer for layer in windowed.layers if isinstance(layer, WindowedKVCache)]
    dropped = (local[0].base - RETAIN_TOKENS) // BLOCK_TOKENS
    assert dropped >= 2
    for layer in local:
        assert layer.kept_from == dropped and all(b is None for b in layer.sealed[:dropped])
        assert layer.encoded_nbytes < windowed.layers[2].encoded_nbytes  # the global layer keeps every block
    assert len(local[0].sealed) == len(windowed.layers[2].sealed) == len(LONG) // BLOCK_TOKENS  # indices kept
    assert windowed.encoded_nbytes < full.encoded_nbytes


def test_cut_within_the_kept_blocks_is_exact_and_beyond_them_starts_afresh(gemma):
    windowed, full = empty(gemma), empty(gemma)
    run(gemma, windowed, LONG)
    run(gemma, full, LONG, windows=False)
    cut = len(LONG) - 500  # a regenerate of a long reply: inside RETAIN_TOKENS
    assert windowed.trim_to(cut) == cut and full.trim_to(cut) == cut
    more = [11, 12, 13, 14]
    near(run(gemma, windowed, more), run(gemma, full, more, windows=False))
    assert windowed.trim_to(300) == 0 and windowed.n_tokens == 0  # block 1 is gone: refuse, start afresh
    assert all(layer.offset == 0 for layer in windowed.layers)
    assert full.trim_to(300) == 300
    fresh = empty(gemma)
    close(run(gemma, windowed, LONG[:300] + more), run(gemma, fresh, LONG[:300] + more, windows=False))


def test_prefix_copy_past_the_kept_blocks_comes_back_empty(gemma):
    """A prefix copy that needs a dropped block comes back empty; one inside the kept blocks is exact."""
    windowed, full = empty(gemma), empty(gemma)
    run(gemma, windowed, LONG)
    run(gemma, full, LONG, windows=False)
    assert windowed.copy_prefix(300).n_tokens == 0
    n = len(LONG) - 400
    a, b = windowed.copy_prefix(n), full.copy_prefix(n)
    assert a.n_tokens == n
    more = [31, 32, 33]
    near(run(gemma, a, more), run(gemma, b, more, windows=False))


def test_disk_holds_global_layers_in_blocks_and_the_window_in_the_tail(gemma, tmp_path):
    from app.bench.common import make_pool
    from app.kvstore.blockfile import read_cache_file

    pool = make_pool(gemma, tmp_path / "home", "q4")
    live = empty(gemma)
    run(gemma, live, LONG)
    pool.save("conv", live, None, "p")
    blocks = sorted((tmp_path / "home" / "caches" / "blocks").rglob("*.safetensors"))
    assert len(blocks) == len(LONG) // BLOCK_TOKENS
    for path in blocks:  # one layer (the global one) per block file
        f = read_cache_file(path, {"layers": "global:2"})
        assert {t.data.shape[0] for t in f.host.values()} == {1}
    tail = read_cache_file(next((tmp_path / "home" / "caches" / "tails").glob("*.safetensors")), {})
    kept_from = int(tail.meta["window_from"])
    local = [layer for layer in live.layers if isinstance(layer, WindowedKVCache)]
    assert kept_from == local[0].kept_from >= 2
    window = {n: t for n, t in tail.host.items() if n.startswith("w.")}
    assert window and all(t.data.shape[:2] == (2, len(LONG) // BLOCK_TOKENS - kept_from) for t in window.values())
    restored = pool.load("conv")
    assert restored.tokens == live.tokens
    assert [getattr(layer, "kept_from", None) for layer in restored.layers][:2] == [kept_from, kept_from]
    more = [21, 22, 23]
    ours, theirs = run(gemma, restored, more), run(gemma, live, more)
    for x, y in zip(ours, theirs):
        assert np.array_equal(x, y)


def test_idle_windowed_cache_compacts_and_expands_exactly(gemma):
    from app.kvstore.manager import CompactCache
    from app.kvstore.schemes import get_scheme

    live = empty(gemma)
    run(gemma, live, LONG)
    compact = CompactCache.of(live)
    back = compact.expand(get_scheme("q4"), gemma.fingerprint)
    assert isinstance(back.layers[0], WindowedKVCache) and back.layers[0].kept_from == live.layers[0].kept_from
    more = [41, 42]
    ours, theirs = run(gemma, back, more), run(gemma, live, more)
    for x, y in zip(ours, theirs):
        assert np.array_equal(x, y)


def test_cache_files_written_before_windowing_are_rebuilt(gemma, tmp_path):
    """Files from before (every layer in each block, no window blocks in the tail) are a miss, never trusted."""
    from app.bench.common import make_pool
    from app.kvstore.pool import LoadMiss

    pool = make_pool(gemma, tmp_path / "home", "q4")
    old = make_pool(gemma, tmp_path / "home", "q4", catalog=pool.store.catalog)
    old.windows = None  # how Parley wrote gemma3 caches before
    live = empty(gemma)
    run(gemma, live, LONG[:700])
    for layer in live.layers:  # the old way kept every block
        if isinstance(layer, WindowedKVCache):
            assert layer.kept_from == 0
    old.save("conv", live, None, "p")
    miss = pool.load("conv")
    assert isinstance(miss, LoadMiss) and not pool.has("conv")
    pool.save("conv", live, None, "p")  # rebuilt and saved again: now it loads
    restored = pool.load("conv")
    assert not isinstance(restored, LoadMiss) and restored.tokens == live.tokens


def test_engine_edit_past_the_kept_blocks_prefills_afresh_and_replies_as_a_new_chat(tmp_path):
    """An edit of the first message of a long gemma3 chat cuts back past what the local layers kept: the
    engine prefills the whole prompt again (not just the part after the old common prefix) and replies
    exactly as a new conversation with the edited message does."""
    from app.catalog import Catalog
    from app.engine import commands as cmd
    from app.engine import events as ev
    from app.model.chat_tokenizer import ChatTokenizer
    from tests.engine_helpers import EngineRunner, write_persona

    folder = build_tiny_arch(tmp_path / "g3", "gemma3", "q4g64")
    write_persona(tmp_path / "personas", "tester", max_tokens=6)
    long_text = " ".join(f"w{i % 97}" for i in range(420))
    assert 1300 < len(ChatTokenizer(folder).encode(long_text)) < 1900
    runner = EngineRunner(folder, tmp_path / "personas")
    try:
        with Catalog() as catalog:
            edited, fresh = catalog.create_conversation("tester"), catalog.create_conversation("tester")
        final, _ = runner.run(cmd.Generate(edited, long_text), timeout=300)
        assert isinstance(final, ev.ReplyFinished)
        with Catalog() as catalog:
            first = catalog.current_path(edited)[0]
        after_edit, _ = runner.run(cmd.EditAndResend(edited, first.id, "Edited question"), timeout=300)
        new_chat, _ = runner.run(cmd.Generate(fresh, "Edited question"), timeout=300)
    finally:
        runner.close()
    assert isinstance(after_edit, ev.ReplyFinished) and isinstance(new_chat, ev.ReplyFinished)
    assert after_edit.stats.reused_tokens == 0
    assert after_edit.stats.prefilled_tokens == new_chat.stats.prefilled_tokens + new_chat.stats.reused_tokens
    assert after_edit.text == new_chat.text


def test_windows_bench_reports_growth_with_the_global_layers_only(gemma, tmp_path):
    """`python -m app.bench.windows`: from 2600 to 3600 tokens the windowed cache grows (RAM and disk) by the
    global layer's share, about a third of what the full cache grows by (one global layer in three)."""
    from app.bench.windows import measure

    full = [measure(gemma, tmp_path / f"f{n}", n, False) for n in (2600, 3600)]
    windowed = [measure(gemma, tmp_path / f"w{n}", n, True) for n in (2600, 3600)]
    for key in ("encoded_ram_kb", "disk_kb"):
        grew_full, grew_windowed = full[1][key] - full[0][key], windowed[1][key] - windowed[0][key]
        assert 0 < grew_windowed < 0.45 * grew_full
