"""The C decode path (app.kvstore.fast_decode) gives bit for bit what `scheme.decode` gives."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from app.kvstore import fast_decode
from app.kvstore.live_cache import SealingKVCache
from app.kvstore.schemes import SCHEMES, KVScheme, TensorQuant

needs_c = pytest.mark.skipif(fast_decode.kernels() is None, reason="no C compiler / PARLEY_CPU_KERNELS=0")


@pytest.fixture(autouse=True)
def full_working_copies(monkeypatch):
    """These tests check restores into fp32 working copies (what caches the compact path does not cover
    get, and what a compact cache decodes when it leaves compact mode); compact restores decode nothing
    (tests/test_compact_cache.py)."""
    monkeypatch.setenv("PARLEY_KV_COMPACT", "0")


def bits(a: mx.array) -> np.ndarray:
    return np.asarray(a.astype(mx.float32)).view(np.uint32)


def kv(h, t, dk, dv, seed):
    mx.random.seed(seed)
    k = mx.random.normal((h, t, dk)) * mx.where(mx.arange(dk) % 16 == 3, 15.0, 1.0)
    v = mx.random.normal((h, t, dv)) * 3.0
    return k.astype(mx.float16).astype(mx.float32), v.astype(mx.float16).astype(mx.float32)


def reference(scheme, blocks, tail_k, tail_v):
    """What SealingKVCache.restore computed before the C path: decode, concatenate, pad."""
    ks, vs = zip(*(scheme.decode(b, mx.float32) for b in blocks)) if blocks else ((), ())
    ks, vs = list(ks), list(vs)
    if tail_k is not None and tail_k.shape[1]:
        ks.append(tail_k.astype(mx.float32))
        vs.append(tail_v.astype(mx.float32))
    return mx.concatenate(ks, axis=1), mx.concatenate(vs, axis=1)


SCHEMES_PLUS = {**SCHEMES, "k4tok32": KVScheme("k4tok32", TensorQuant(bits=4, axis="token", group=32),
                                                   TensorQuant(bits=8, axis="channel", group=64))}


@needs_c
@pytest.mark.parametrize("name", sorted(SCHEMES_PLUS))
@pytest.mark.parametrize("t,n_blocks,n_tail", [(256, 3, 40), (256, 1, 0), (100, 2, 1), (7, 2, 5), (257, 1, 3)])
def test_single_layer_restore_is_bitwise_decode(name, t, n_blocks, n_tail):
    scheme = SCHEMES_PLUS[name]
    blocks = [scheme.encode(*kv(3, t, 64, 64, seed=i)) for i in range(n_blocks)]
    tk, tv = kv(3, n_tail, 64, 64, seed=99)
    tk16, tv16 = tk.astype(mx.float16), tv.astype(mx.float16)
    for tail in ((tk16, tv16), (tk, tv)):
        assert fast_decode.decode_layers(scheme, 1, [{n: [a] for n, a in b.items()} for b in blocks],
                                         [tail[0]], [tail[1]], mx.float32, 256) is not None
        cache = SealingKVCache.restore(scheme, blocks, *tail, mx.float32, block_tokens=t)
        rk, rv = reference(scheme, blocks, *tail)
        n = rk.shape[1]
        assert cache.offset == n and cache.keys.shape[2] == n + (-n) % cache.step
        assert np.array_equal(bits(cache.keys[0, :, :n]), bits(rk))
        assert np.array_equal(bits(cache.values[0, :, :n]), bits(rv))
        assert not np.asarray(cache.keys[0, :, n:]).any() and not np.asarray(cache.values[0, :, n:]).any()


@needs_c
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_stacked_layers_and_edge_values(name, threads, monkeypatch):
    """Many layers from stacked (file-like) arrays, with zero ranges, huge and tiny values; one or two decode threads."""
    monkeypatch.setattr(fast_decode, "DECODE_THREADS", threads)
    scheme = SCHEMES[name]
    n_layers = 4
    per_layer = []
    for i in range(n_layers):
        blocks = []
        for b in range(2):
            k, v = kv(2, 256, 64, 64, seed=10 * i + b)
            k = mx.where(mx.arange(64) == 5, 0.0, k)  # a constant channel: scale 0
            v = v * mx.where(mx.arange(256)[:, None] == 3, 1e4, 1.0) * mx.where(mx.arange(256)[:, None] == 9, 1e-6, 1.0)
            blocks.append(scheme.encode(k, v))
        per_layer.append(blocks)
    stacked = [{n: mx.stack([per_layer[i][b][n] for i in range(n_layers)]) for n in per_layer[0][b]} for b in range(2)]
    mx.eval(stacked)
    tk = mx.stack([kv(2, 13, 64, 64, seed=50 + i)[0] for i in range(n_layers)]).astype(mx.float16)
    tv = mx.stack([kv(2, 13, 64, 64, seed=60 + i)[1] for i in range(n_layers)]).astype(mx.float16)
    mx.eval(tk, tv)
    assert fast_decode.decode_layers(scheme, n_layers, stacked, tk, tv, mx.float32, 256) is not None
    caches = SealingKVCache.restore_layers(scheme, stacked, per_layer, tk, tv, mx.float32)
    for i, cache in enumerate(caches):
        rk, rv = reference(scheme, per_layer[i], tk[i], tv[i])
        n = rk.shape[1]
        assert cache.offset == n == 525 and len(cache.sealed) == 2
        assert np.array_equal(bits(cache.keys[0, :, :n]), bits(rk))
        assert np.array_equal(bits(cache.values[0, :, :n]), bits(rv))


def test_fallbacks_without_c_path(monkeypatch):
    """No kernels, other dtypes or scheme options: MLX decode, same values."""
    scheme = SCHEMES["q4"]
    blocks = [scheme.encode(*kv(3, 256, 64, 64, seed=i)) for i in range(2)]
    tk, tv = kv(3, 5, 64, 64, seed=7)
    rk, rv = reference(scheme, blocks, tk, tv)
    assert fast_decode.decode_layers(scheme, 1, [], None, None, mx.float16, 256) is None
    rot = KVScheme("rot", TensorQuant(bits=4, rotate=True), TensorQuant(bits=4))
    assert fast_decode.decode_layers(rot, 1, [{n: [a] for n, a in rot.encode(*kv(3, 256, 64, 64, 0)).items()}],
                                     None, None, mx.float32, 256) is None
    monkeypatch.setattr(fast_decode, "_lib", None)
    cache = SealingKVCache.restore(scheme, blocks, tk, tv, mx.float32)
    assert np.array_equal(bits(cache.keys[0, :, :517]), bits(rk))
    assert np.array_equal(bits(cache.values[0, :, :517]), bits(rv))
    c16 = SealingKVCache.restore(scheme, blocks, tk, tv, mx.float16)
    assert c16.keys.dtype == mx.float16


@needs_c
def test_working_copies_on_several_threads():
    """Each engine thread (a new Engine, a second process's worth of tests) gets its own fill streams."""
    import threading

    scheme = SCHEMES["q4"]
    blocks = [scheme.encode(*kv(2, 256, 64, 64, seed=1))]
    expect = reference(scheme, blocks, None, None)
    mx.eval(blocks, expect)  # evaluated here: lazy arrays of this thread cannot be evaluated on another
    results = []

    def restore():
        fast = fast_decode.decode_layers(scheme, 1, [{n: [a] for n, a in b.items()} for b in blocks], None, None,
                                         mx.float32, 256)
        results.append(np.array_equal(bits(fast[0][0][0, :, :256]), bits(expect[0])))

    for _ in range(2):
        t = threading.Thread(target=restore)
        t.start()
        t.join()
    restore()
    assert results == [True, True, True]
