"""The persistent Q4 KV cache: exact restore, integrity, crash safety, sharing, RAM budget."""

from __future__ import annotations

import shutil

import mlx.core as mx
import pytest

from app.catalog import Catalog
from app.catalog.caches import CacheStore
from app.kvstore.blockfile import FORMAT_VERSION
from app.kvstore.manager import CacheManager
from app.kvstore.pool import BlockPool
from app.kvstore.pool import LoadMiss
from app.model.loader import load_model
from tests.kv_helpers import fill, make_pool, next_logits, tokens


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.mark.parametrize("scheme", ["q4", "k8v4", "q8", "f16"])
def test_restored_cache_gives_identical_logits(lm, scheme):
    pool = make_pool(lm, scheme)
    live = fill(lm, pool, tokens(700))
    assert live.n_sealed == 2
    pool.save("conv:1", live, None, "p")
    restored = pool.load("conv:1")
    assert restored.tokens == live.tokens
    probe = tokens(5, seed=9)
    assert mx.array_equal(next_logits(lm, live, probe), next_logits(lm, restored, probe))


@pytest.mark.parametrize("given", ["none", "model", "wrong"])
def test_restore_with_the_working_copies_sized_up_front(lm, given, monkeypatch):
    """The pool zero-fills working copies before the first block arrives when it knows the KV shape;
    a wrong shape is refused by the C path and decoded by MLX instead: exact either way. (Full working
    copies: compact caches decode nothing on restore.)"""
    from app.engine.session import kv_shape

    monkeypatch.setenv("PARLEY_KV_COMPACT", "0")

    shape = {"none": None, "model": kv_shape(lm.model), "wrong": (7, 16, 16)}[given]
    pool = make_pool(lm)
    pool.kv_shape = shape
    live = fill(lm, pool, tokens(700))
    pool.save("conv:1", live, None, "p")
    restored = pool.load("conv:1")
    probe = tokens(5, seed=9)
    assert mx.array_equal(next_logits(lm, live, probe), next_logits(lm, restored, probe))
    assert pool.kv_shape == (shape or kv_shape(lm.model))  # learned from the first block when not given


def test_sealed_blocks_really_are_quantized(lm):
    pool = make_pool(lm, "q4")
    cache = fill(lm, pool, tokens(300))
    raw = fill(lm, make_pool(lm, "f16"), tokens(300))
    assert not mx.array_equal(cache.layers[0].span(0, 256)[0], raw.layers[0].span(0, 256)[0])
    # the tail (tokens 256..299) stays full precision: identical to an unquantized run up to attention effects
    assert cache.layers[0].keys.dtype == mx.float32


def test_a_turn_writes_only_new_blocks(lm):
    pool = make_pool(lm)
    cache = fill(lm, pool, tokens(600))
    first = pool.save("conv:1", cache, None, "p")
    assert first.blocks_written == 2
    more = tokens(40, seed=3)
    mx.eval(lm.model(mx.array([more]), cache=cache.layers))
    cache.appended(more)
    second = pool.save("conv:1", cache, None, "p")
    assert second.blocks_written == 0  # only the tail was rewritten
    tail_files = list((pool.root / "tails").iterdir())
    assert len(tail_files) == 1 and second.bytes_written == tail_files[0].stat().st_size


def _block_files(pool):
    return sorted((pool.root / "blocks").rglob("*.safetensors"))


def _corrupt(kind: str, pool, lm):
    files = _block_files(pool)
    if kind == "truncate":
        data = files[0].read_bytes()
        files[0].write_bytes(data[: len(data) // 2])
    elif kind == "flip":
        data = bytearray(files[1].read_bytes())
        data[-100] ^= 0x01
        files[1].write_bytes(bytes(data))
    elif kind == "swap":
        a, b = files[0].read_bytes(), files[1].read_bytes()
        files[0].write_bytes(b)
        files[1].write_bytes(a)
    elif kind == "version":
        data, stamp = files[0].read_bytes(), f'"format":"{FORMAT_VERSION}"'.encode()
        assert stamp in data
        files[0].write_bytes(data.replace(stamp, b'"format":"9"'))
    elif kind == "foreign":
        # the same tokens cached by another model: same layout, other fingerprint
        other = BlockPool(CacheStore(Catalog(pool.root.parent / "other.db")), pool.root.parent / "other", "0" * 64, pool.scheme, lm.n_layers)
        other.save("conv:1", fill(lm, other, tokens(600)), None, "p")
        for mine, theirs in zip(files, _block_files(other)):
            shutil.copyfile(theirs, mine)
    elif kind == "tail-missing":
        for f in (pool.root / "tails").iterdir():
            f.unlink()


@pytest.mark.parametrize("kind", ["truncate", "flip", "swap", "version", "foreign", "tail-missing"])
def test_corruption_is_a_miss_never_used(lm, kind):
    pool = make_pool(lm)
    pool.save("conv:1", fill(lm, pool, tokens(600)), None, "p")
    _corrupt(kind, pool, lm)
    result = pool.load("conv:1")
    assert isinstance(result, LoadMiss), result
    assert not pool.has("conv:1")  # dropped, to be rebuilt from the transcript
    assert pool.load("conv:1") is None


def test_version_bump_in_header_is_detected(lm):
    pool = make_pool(lm)
    pool.save("conv:1", fill(lm, pool, tokens(300)), None, "p")
    data = _block_files(pool)[0].read_bytes()
    assert f'"format":"{FORMAT_VERSION}"'.encode() in data  # the "version" corruption edits exactly this


def test_cache_from_another_scheme_is_a_miss(lm):
    pool = make_pool(lm, "q4")
    pool.save("conv:1", fill(lm, pool, tokens(300)), None, "p")
    assert isinstance(make_pool(lm, "q8").load("conv:1"), LoadMiss)


def test_shared_prefix_blocks_are_stored_once(lm):
    pool = make_pool(lm)
    prefix = tokens(512)
    a = fill(lm, pool, prefix + tokens(100, seed=1))
    b = fill(lm, pool, prefix + tokens(100, seed=2))
    pool.save("conv:1", a, None, "p")
    pool.save("conv:2", b, None, "p")
    assert len(_block_files(pool)) == 2
    pool.drop("conv:1")
    assert pool.gc(grace=0) == (0, 0)  # still used by conv:2
    pool.drop("conv:2")
    files, freed = pool.gc(grace=0)
    assert files == 2 and freed > 0 and _block_files(pool) == []


def test_cache_files_are_private(lm):
    pool = make_pool(lm)
    pool.save("conv:1", fill(lm, pool, tokens(300)), None, "p")
    for f in _block_files(pool) + list((pool.root / "tails").iterdir()):
        assert f.stat().st_mode & 0o077 == 0


def test_reconcile_removes_orphans_and_dangling_rows(lm):
    pool = make_pool(lm)
    pool.save("conv:1", fill(lm, pool, tokens(300)), None, "p")
    stray = pool.root / "blocks" / "zz" / "orphan.safetensors"
    stray.parent.mkdir()
    stray.write_bytes(b"x")
    for f in (pool.root / "tails").iterdir():
        f.unlink()
    files, _ = pool.reconcile(grace=0)
    assert files >= 1 and not stray.exists()
    assert not pool.has("conv:1")


def test_eviction_keeps_ram_under_budget(lm):
    pool = make_pool(lm)
    one = fill(lm, pool, tokens(600, seed=0))
    manager = CacheManager(pool, budget_bytes=0)
    manager.put("conv:1", one, None, "p")
    manager.pin("conv:1")
    per_cache = manager.ram_bytes()
    manager.budget_bytes = int(per_cache * 1.5)
    for i in range(2, 6):
        manager.put(f"conv:{i}", fill(lm, pool, tokens(600, seed=i)), None, "p")
        manager.pin(f"conv:{i}")
        assert manager.ram_bytes() <= manager.budget_bytes
    assert "conv:5" in manager.entries  # the pinned one stays
    cache, source, _ = manager.get("conv:1")  # evicted earlier: comes back from disk
    assert source == "disk" and cache.n_tokens == 600


def test_discard_drops_from_ram_unsaved_and_unpins(lm):
    """What a scene round does with a cache a failed step left out of step: the copy on disk stays the last good one."""
    pool = make_pool(lm)
    manager = CacheManager(pool, budget_bytes=1 << 40)
    manager.put("conv:1", fill(lm, pool, tokens(300)), None, "p")
    manager.save("conv:1")
    manager.put("conv:1", fill(lm, pool, tokens(400)), None, "p")  # newer, dirty, never saved
    manager.pin("conv:1")
    manager.discard("conv:1")
    assert "conv:1" not in manager.entries and manager.pinned is None
    cache, source, _ = manager.get("conv:1")
    assert source == "disk" and cache.n_tokens == 300


def test_compact_caches_take_less_ram_and_come_back_exact(lm):
    pool = make_pool(lm)
    manager = CacheManager(pool, budget_bytes=1 << 40)
    live = fill(lm, pool, tokens(512 + 40))
    probe = tokens(3, seed=5)
    manager.put("conv:1", live, None, "p")
    manager.pin("conv:1")
    full = manager.ram_bytes()
    live.tail_arrays()  # as a save does: the fp32 tail now holds fp16-exact values
    expected = next_logits(lm, live.copy_prefix(live.n_tokens), probe)
    manager.pin(None)  # switch away: conv:1 goes compact
    assert manager.ram_bytes() < full / 3
    back, source, _ = manager.get("conv:1")
    assert source == "ram"
    assert mx.array_equal(next_logits(lm, back, probe), expected)


def test_saving_rounds_the_tail_in_place_without_copying_the_working_copy(lm):
    """A save rounds the fp32 tail to fp16 values in the working copy itself: a copy of the whole
    working copy per save made saving cost more the longer the conversation."""
    import numpy as np

    pool = make_pool(lm)
    cache = fill(lm, pool, tokens(300))
    ptrs = [np.asarray(memoryview(layer.keys)).ctypes.data for layer in cache.layers]
    tail = cache.tail_arrays()
    mx.eval(tail, [layer.keys for layer in cache.layers])
    assert [np.asarray(memoryview(layer.keys)).ctypes.data for layer in cache.layers] == ptrs
    layer = cache.layers[0]
    kept = layer.keys[..., layer.sealed_tokens - layer.base:layer.offset - layer.base, :]
    assert mx.array_equal(kept, kept.astype(mx.float16).astype(mx.float32))  # rounded, in place
    assert mx.array_equal(tail["k"][0], kept[0].astype(mx.float16))
