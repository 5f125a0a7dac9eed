"""The architecture matrix: tiny random models of every supported family, against mlx-lm's own model.

For each architecture x {4-bit group 64, 4-bit group 32, fp16}, Parley's model (loaded by `load_model`,
rewritten by the CPU fast path, run through the engine's own `prefill` in chunks and one-token steps over
a `ConversationCache`) must give mlx-lm's logits within fp32 rounding, teacher-forced over a prompt and
decode steps; with the C kernels on and off. A conversation resumed from disk (f16 scheme) continues
with the greedy tokens of a fresh prefill of the same transcript.
"""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

from app.model import cpu_fast, cpu_kernels
from app.model.tiny_zoo import ARCHITECTURES, QUANTIZATIONS, build_tiny_arch
from tests.engine_helpers import teacher_forced_logits

PROMPT = [5 + (i * 7) % 300 for i in range(21)]  # longer than gemma3's tiny sliding window (8)
FORCED = [11, 42, 7, 250, 99, 3]
# Architectures whose attention runs through `CpuAttention` (their math is its math); the others run
# the model's own attention (softcaps: gemma2; MLA: deepseek_v2; fused qkv: phi3).
FAST_ATTENTION = {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folders = {}

    def get(arch: str, quant: str):
        if (arch, quant) not in folders:
            folders[arch, quant] = build_tiny_arch(tmp_path_factory.mktemp(f"{arch}-{quant}") / arch, arch, quant)
        return folders[arch, quant]

    return get


@pytest.fixture
def kernels_off(monkeypatch):
    monkeypatch.setenv("PARLEY_CPU_KERNELS", "0")
    cpu_kernels.reset()  # rebuilt (as None) on next use
    yield
    cpu_kernels.reset()


def reference_logits(folder) -> list[np.ndarray]:
    """mlx-lm's own model (fp32 activations), its own caches, the whole prompt at once, then one token a step."""
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model as mlx_load_model

    model, _ = mlx_load_model(folder)
    model.apply(lambda x: x.astype(mx.float32) if x.dtype in (mx.float16, mx.bfloat16) else x)
    cache = make_prompt_cache(model)
    out = [model(mx.array([PROMPT]), cache=cache)[0, -1]]
    for t in FORCED:
        out.append(model(mx.array([[t]]), cache=cache)[0, -1])
    return [np.array(o) for o in out]


def parley_logits(lm, chunk: int = 8) -> list[np.ndarray]:
    return teacher_forced_logits(lm, PROMPT, FORCED, chunk)


def assert_same_logits(ours, ref) -> None:
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        scale = float(np.abs(b).max())
        assert np.abs(a - b).max() <= 2e-5 * scale + 1e-6, f"position {i}: max diff {np.abs(a - b).max()} (scale {scale})"
        assert int(a.argmax()) == int(b.argmax())


def uses_fast_attention(model) -> bool:
    return any(isinstance(layer.self_attn, cpu_fast.CpuAttention) for layer in model.layers)


@pytest.mark.parametrize("quant", QUANTIZATIONS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_equal_mlx_lm(built, arch, quant):
    from app.model.loader import load_model

    folder = built(arch, quant)
    lm = load_model(str(folder))
    assert uses_fast_attention(lm.model) == (arch in FAST_ATTENTION and cpu_fast.kernels() is not None)
    assert_same_logits(parley_logits(lm), reference_logits(folder))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_equal_mlx_lm_without_kernels(built, arch, kernels_off):
    from app.model.loader import load_model

    folder = built(arch, "q4g64")
    lm = load_model(str(folder))
    assert not uses_fast_attention(lm.model)
    assert_same_logits(parley_logits(lm), reference_logits(folder))


@pytest.mark.parametrize("arch", sorted(FAST_ATTENTION))
def test_quantized_decode_kernels_group_32(built, arch, monkeypatch):
    """The 4-bit gemv decode path (AVX-512 machines; forced on here with the portable build of the same
    kernel) on models without a `head_dim` attribute (qwen2/qwen3) and with q/k norms (qwen3, gemma3)."""
    from app.model.loader import load_model

    if cpu_fast.kernels() is None:
        pytest.skip("no C compiler: the CPU kernels are off")
    monkeypatch.setattr(cpu_fast.Q4Weights, "usable", staticmethod(
        lambda m: getattr(m, "bits", 0) in (4, 8) and getattr(m, "group_size", 0) == 32 and "biases" in m))
    folder = built(arch, "q4g32")
    lm = load_model(str(folder))
    attn = lm.model.layers[0].self_attn
    assert attn.o_q4() is not None and (arch == "qwen2" or attn.__dict__.get("_qkv") is not None)  # qwen2: biases
    assert_same_logits(parley_logits(lm), reference_logits(folder))


def test_model_facts_come_from_the_modules(built):
    """Nested text_config (gemma3), no head_dim attribute (qwen2), unequal key/value widths (deepseek_v2)."""
    from app.model.loader import load_model

    g = load_model(str(built("gemma3", "q4g64")))
    assert (g.n_layers, g.n_kv_heads, g.head_dim, g.context_window) == (3, 2, 32, 2048)
    q = load_model(str(built("qwen2", "q4g64")))
    assert (q.n_kv_heads, q.head_dim) == (2, 16)
    d = load_model(str(built("deepseek_v2", "q4g64")))
    assert (d.n_kv_heads, d.head_dim, d.value_dim) == (4, 64, 64)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_resumed_from_disk_continues_like_a_fresh_prefill(built, arch, tmp_path):
    """f16 scheme: a transcript saved, restored from disk and continued gives the greedy tokens a fresh
    prefill of the whole transcript gives (one sealed 256-token block plus a tail)."""
    from app.bench.common import fill, make_pool
    from app.engine.commands import Sampling
    from app.engine.generation import decode, prefill
    from app.model.loader import load_model

    lm = load_model(str(built(arch, "q4g64")))
    pool = make_pool(lm, tmp_path / "home", "f16")
    history = [5 + (i * 13) % 300 for i in range(270)]
    message = [17, 23, 99, 4, 61]
    cache, _ = fill(lm, pool, history)
    pool.save("conv", cache, None, "p")
    restored = pool.load("conv")
    assert restored is not None and not hasattr(restored, "reason") and restored.n_tokens == len(history)

    def continue_from(c, ids):
        logits = None
        for step in prefill(lm.model, c, ids):
            logits = step.logits
        return list(decode(lm.model, c, logits, Sampling(temperature=0.0, max_tokens=8), set()))

    resumed = continue_from(restored, message)
    fresh, _ = fill(lm, pool, [])
    assert continue_from(fresh, history + message) == resumed


@pytest.mark.parametrize("quant", ["q4g64", "q4g32"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lean_cpu_path_equals_mlx_lm(built, arch, quant, monkeypatch):
    """Weights kept 4-bit in RAM (`PARLEY_LEAN_MB=0` makes every model lean): same logits as mlx-lm."""
    import mlx.nn as nn

    from app.model.loader import load_model

    monkeypatch.setenv("PARLEY_LEAN_MB", "0")
    folder = built(arch, quant)
    lm = load_model(str(folder))
    assert any(isinstance(m, cpu_fast.LeanLinear) for _, m in lm.model.named_modules())
    assert not any(type(m) is nn.Linear or isinstance(m, cpu_fast.CpuLinear) for _, m in lm.model.named_modules())
    assert_same_logits(parley_logits(lm), reference_logits(folder))
