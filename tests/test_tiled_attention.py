"""The tiled and the fused prefill attention of app.model.cpu_attention against a float64 numpy reference.

Shapes over GQA ratios (1, 3, 4), chunks shorter and longer than a tile (and not a multiple of it), keys
before the chunk (a cache) or none, causal and not; and the tiny model's prefill through it equals mlx-lm's
own attention within fp32 rounding.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from app.model import cpu_attention
from app.model.cpu_kernels import kernels

pytestmark = pytest.mark.skipif(kernels() is None, reason="no C compiler / PARLEY_CPU_KERNELS=0")


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool) -> np.ndarray:
    _, H, L, _ = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = H // Hkv
    out = np.zeros((1, H, L, v.shape[3]))
    for h in range(H):
        s = q[0, h].astype(np.float64) @ k[0, h // G].astype(np.float64).T
        if causal:
            s = np.where(np.arange(T)[None, :] > (T - L + np.arange(L))[:, None], -np.inf, s)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        out[0, h] = (p / p.sum(axis=1, keepdims=True)) @ v[0, h // G].astype(np.float64)
    return out


@pytest.mark.parametrize("H, Hkv", [(4, 4), (9, 3), (8, 2)])
@pytest.mark.parametrize("L, before", [(130, 0), (256, 40), (300, 700), (600, 0), (513, 1000)])
@pytest.mark.parametrize("causal", [1, 0])
def test_tiled_attention_matches_a_float64_reference(H, Hkv, L, before, causal):
    rng = np.random.default_rng(L * 31 + before + H)
    D, T = 16, L + before
    q = rng.standard_normal((1, H, L, D)).astype(np.float32) * 0.5
    k = rng.standard_normal((1, Hkv, T, D)).astype(np.float32)
    v = rng.standard_normal((1, Hkv, T, D)).astype(np.float32)
    got = cpu_attention.tiled_attention(mx.array(q), mx.array(k), mx.array(v), causal)
    np.testing.assert_allclose(np.array(got), reference(q, k, v, bool(causal)), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("H, Hkv", [(4, 4), (9, 3)])
@pytest.mark.parametrize("L, before, headroom", [(33, 0, 0), (300, 700, 56), (513, 1000, 0)])
@pytest.mark.parametrize("causal", [1, 0])
def test_fused_attention_matches_a_float64_reference_and_the_tiled_path(H, Hkv, L, before, headroom, causal):
    """Keys/values as a cache hands them over: a slice of a longer buffer (heads `capacity` rows apart)."""
    rng = np.random.default_rng(L * 7 + before + H)
    D, T = 64, L + before
    q = rng.standard_normal((1, H, L, D)).astype(np.float32) * 0.2
    k = rng.standard_normal((1, Hkv, T + headroom, D)).astype(np.float32)
    v = rng.standard_normal((1, Hkv, T + headroom, D)).astype(np.float32)
    ks, vs = mx.array(k)[..., :T, :], mx.array(v)[..., :T, :]
    got = cpu_attention.fused_attention(mx.array(q), ks, vs, causal)
    assert got is not None and got.shape == (1, L, H * D)
    ref = reference(q, k[:, :, :T], v[:, :, :T], bool(causal)).transpose(0, 2, 1, 3).reshape(1, L, H * D)
    np.testing.assert_allclose(np.array(got), ref, rtol=1e-4, atol=4e-6)
    tiled = cpu_attention.tiled_attention(mx.array(q), ks, vs, causal).transpose(0, 2, 1, 3).reshape(1, L, H * D)
    np.testing.assert_allclose(np.array(got), np.array(tiled), rtol=1e-4, atol=4e-6)


def test_fused_attention_declines_what_it_cannot_read():
    q = mx.zeros((1, 2, 40, 8))
    assert cpu_attention.fused_attention(q, mx.zeros((1, 2, 40, 8), mx.float16), mx.zeros((1, 2, 40, 8)), 1) is None
    assert cpu_attention.fused_attention(q, mx.zeros((1, 2, 20, 8)), mx.zeros((1, 2, 20, 8)), 1) is None  # T < L
    strided = mx.zeros((1, 2, 80, 8))[..., ::2, :]  # rows not contiguous
    assert cpu_attention.head_rows(strided) is None


def test_long_chunk_prefill_of_the_tiny_model_matches_mlx_lm_attention(tiny_model_dir):
    """A 600-token chunk (tiled) over a 300-token cache: CpuAttention against the model's original attention."""
    from mlx_lm.models.cache import KVCache

    from app.model.loader import load_model
    from tests.kv_helpers import tokens

    fast = load_model(str(tiny_model_dir))
    plain = load_model(str(tiny_model_dir), fast_cpu=False)
    outs = []
    for lm in (fast, plain):
        cache = [KVCache() for _ in lm.model.layers]
        mx.eval(lm.model(mx.array([tokens(300)]), cache=cache))
        outs.append(np.array(lm.model(mx.array([tokens(600, seed=1)]), cache=cache)))
    assert isinstance(fast.model.model.layers[0].self_attn, cpu_attention.CpuAttention)
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4)
