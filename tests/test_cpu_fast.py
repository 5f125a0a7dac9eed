"""app.model.cpu_fast: the CPU rewrite keeps the model's outputs; prefill_logits equals the last row."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from app.model.cpu_fast import prefill_logits, speed_up_for_cpu
from app.model.loader import load_model

PROMPT = [{"role": "user", "content": "What is the capital of France? Tell me about it."}]


def _ids(lm):
    return lm.tokenizer.encode_chat(PROMPT)


def _close(a, b, tol=2e-3):
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    scale = max(1.0, float(np.abs(b).max()))
    assert np.abs(a - b).max() <= tol * scale, np.abs(a - b).max()


def test_sped_up_tiny_model_matches_the_quantized_reference(tiny_model_dir):
    ref = load_model(str(tiny_model_dir), fast_cpu=False)
    fast = load_model(str(tiny_model_dir), fast_cpu=False)
    speed_up_for_cpu(fast.model)
    ids = mx.array([_ids(ref)])
    _close(fast.model(ids), ref.model(ids))


def test_sped_up_model_matches_with_a_cache_prefill_then_decode(tiny_model_dir):
    ref = load_model(str(tiny_model_dir), fast_cpu=False)
    fast = load_model(str(tiny_model_dir))  # the loader applies speed_up_for_cpu on CPU
    ids = _ids(ref)
    for lm_a, lm_b in [(fast, ref)]:
        ca, cb = make_prompt_cache(lm_a.model), make_prompt_cache(lm_b.model)
        mx.eval(lm_a.model(mx.array([ids[:5]]), cache=ca), lm_b.model(mx.array([ids[:5]]), cache=cb))
        for t in ids[5:12]:
            _close(lm_a.model(mx.array([[t]]), cache=ca), lm_b.model(mx.array([[t]]), cache=cb))


def test_prefill_logits_is_the_last_row_of_the_full_forward(tiny_model_dir):
    lm = load_model(str(tiny_model_dir))
    ids = mx.array([_ids(lm)])
    full = lm.model(ids, cache=make_prompt_cache(lm.model))
    cache = make_prompt_cache(lm.model)
    last = prefill_logits(lm.model, ids, cache)
    assert last.shape == (1, 1, full.shape[-1])
    _close(last, full[:, -1:], tol=1e-5)
    assert cache[0].offset == ids.shape[1]


def test_prefill_logits_in_chunks_matches_one_shot(tiny_model_dir):
    lm = load_model(str(tiny_model_dir))
    ids = mx.array([_ids(lm)])
    one = prefill_logits(lm.model, ids, make_prompt_cache(lm.model))
    cache = make_prompt_cache(lm.model)
    n = ids.shape[1]
    for s in range(0, n, 4):
        out = prefill_logits(lm.model, ids[:, s:s + 4], cache)
    _close(out, one, tol=1e-4)


@pytest.mark.real_model
def test_embedded_model_sped_up_matches_the_4bit_reference(embedded_model_dir):
    ref = load_model(str(embedded_model_dir), fast_cpu=False)
    fast = load_model(str(embedded_model_dir))
    ids = mx.array([_ids(ref)])
    a = fast.model(ids, cache=make_prompt_cache(fast.model))
    b = ref.model(ids, cache=make_prompt_cache(ref.model))
    _close(a, b, tol=5e-3)  # fp32 dequantized vs MLX's 4-bit kernel: ~0.25% of the largest logit
    assert (mx.argmax(a, axis=-1) == mx.argmax(b, axis=-1)).all().item()
    last = prefill_logits(fast.model, ids, make_prompt_cache(fast.model))
    _close(last, a[:, -1:], tol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_gemv_kernel_matches_mlx(bits):
    from app.model import cpu_fast

    k = cpu_fast.kernels()
    if k is None or k.q4_fast() != 1:
        pytest.skip("no C compiler or no AVX-512 here: decode stays on the fp32 path")
    import mlx.nn as nn

    mx.random.seed(0)
    layer = nn.QuantizedLinear(96, 80, bias=False, group_size=32, bits=bits)
    x = mx.random.normal((1, 1, 96))
    _close(cpu_fast.Q4Weights.of(layer)(x), layer(x), tol=1e-5)


def test_decode_steps_use_the_quantized_kernels_when_available(tiny_model_dir):
    from app.model import cpu_fast

    lm = load_model(str(tiny_model_dir))
    layer = lm.model.model.layers[0]
    assert isinstance(layer.self_attn, cpu_fast.CpuAttention) == (cpu_fast.kernels() is not None)
    if cpu_fast.kernels() is not None and cpu_fast.kernels().q4_fast() == 1:
        assert layer.self_attn.__dict__["_qkv"] is not None
        assert layer.mlp.__dict__["_gate_up"] is not None
    # the parameter tree is the quantized model's (fp32 copies are kept outside it), with floats in fp32
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(lm.model.parameters()))
    assert all(v.dtype in (mx.float32, mx.uint32) for v in params.values())
    ref = load_model(str(tiny_model_dir), fast_cpu=False)
    assert set(params) == set(dict(tree_flatten(ref.model.parameters())))


def test_loading_the_kernels_keeps_subnormal_floats():
    """Linking with -ffast-math would turn on flush-to-zero for the whole process."""
    from app.model import cpu_fast

    cpu_fast.kernels()
    tiny = 5e-324
    assert tiny * 1.0 != 0.0


def test_host_rms_norm_is_bitwise_mlx():
    from app.model.cpu_fast import rms_host

    rng = np.random.default_rng(0)
    for n in (64, 576):
        w = (rng.standard_normal(n) * 0.3 + 1).astype(np.float32)
        for _ in range(200):
            x = (rng.standard_normal(n) * rng.uniform(0.01, 50)).astype(np.float32)
            ref = np.array(mx.fast.rms_norm(mx.array(x), mx.array(w), 1e-5))
            assert (rms_host(x, w, 1e-5) == ref).all()


def test_host_decode_block_is_bitwise_the_layerwise_path(tiny_model_dir, monkeypatch):
    from app.model import cpu_blocks, cpu_fast

    calls = []
    rms = cpu_blocks.rms_host
    monkeypatch.setattr(cpu_blocks, "rms_host", lambda *a: calls.append(1) or rms(*a))

    a = load_model(str(tiny_model_dir))
    b = load_model(str(tiny_model_dir))
    layers = b.model.model.layers
    if not isinstance(layers[0], cpu_fast.CpuBlock) or cpu_fast.kernels().q4_fast() != 1:
        pytest.skip("no C kernels / AVX-512 here: the host block needs the quantized gemv kernels")
    for layer in layers:  # b: the per-module decode path (no host block)
        layer.__class__ = layer.__class__.__mro__[2]
    ids = _ids(a)
    ca, cb = make_prompt_cache(a.model), make_prompt_cache(b.model)
    mx.eval(prefill_logits(a.model, mx.array([ids]), ca), prefill_logits(b.model, mx.array([ids]), cb))
    for t in ids[:6]:
        la, lb = a.model(mx.array([[t]]), cache=ca), b.model(mx.array([[t]]), cache=cb)
        assert (np.array(la) == np.array(lb)).all()
    assert len(calls) == 6 * 2 * len(layers)  # the host block ran every decode step
    for x, y in zip(ca, cb):
        assert (np.array(x.state[0]) == np.array(y.state[0])).all() and (np.array(x.state[1]) == np.array(y.state[1])).all()


def test_silu_kernel_stays_finite_for_gates_below_minus_88():
    """The fast-math vector expf overflowed to NaN for silu(x) with x < -88 (seen on a Q6_K GGUF model)."""
    import numpy as np

    from app.model.cpu_fast import kernels

    if kernels() is None:
        pytest.skip("no C compiler: the CPU kernels are off")
    x = np.array([-139.0, -90.0, -88.5, -10.0, 0.0, 3.0, 100.0] * 3, np.float32)
    g, u = x.copy(), np.full_like(x, 2.0)
    kernels().silu_mul(g.ctypes.data, u.ctypes.data, g.size)
    expected = 2.0 * x.astype(np.float64) / (1.0 + np.exp(-x.astype(np.float64)))
    assert np.isfinite(g).all() and np.allclose(g, expected, rtol=1e-5, atol=1e-6)
