"""The fused one-token step (app/model/decode_step.py, app/csrc/decode_step.c) against the per-module path.

Both paths run the same gemv, attention and SiLU kernels on the same inputs, and the fused kernel computes
RMSNorm and rope with MLX's own arithmetic (rope's cos/sin come from the model's rope module), so the
logits and the cache contents are expected bit for bit equal, not merely within rounding: the tests
assert equality. (Were a kernel to change its summation order in one path only, the right tolerance would
be fp32 rounding through 30 layers, ~1e-4 relative on logits of size ~10; equality is the stronger
check and holds today on every variant.) The per-module path is what `PARLEY_FUSED_STEP=0` runs.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from app.kvstore import block_attention
from app.kvstore.live_cache import BLOCK_TOKENS
from app.model import cpu_kernels
from app.model.decode_step import FusedPlan, FusedStepModel, fused_step_active
from app.model.loader import load_model
from tests.kv_helpers import fill, greedy_steps, make_pool, tokens

pytestmark = pytest.mark.skipif(block_attention.kernels() is None or not cpu_kernels.kernels().q4_fast(),
                                reason="no C compiler / PARLEY_CPU_KERNELS=0 / no vector gemv")


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def decode(lm, cache, first: int, steps: int, monkeypatch, fused: bool) -> tuple[list[np.ndarray], list[int]]:
    """`steps` greedy one-token steps from `first` through the fused step or the per-module path."""
    monkeypatch.setenv("PARLEY_FUSED_STEP", "1" if fused else "0")

    def check(logits):
        assert logits.shape == (1, 1, lm.model.__dict__["_fused_plan"].vocab) and logits.dtype == mx.float32

    return greedy_steps(lm, cache, first, steps, check)


def plan_of(lm) -> FusedPlan:
    plan = lm.model.__dict__.get("_fused_plan")
    assert isinstance(lm.model, FusedStepModel) and plan is not None
    return plan


def assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert np.array_equal(x, y), f"step {i}: max difference {np.abs(x - y).max()}"


def assert_same_cache(a, b) -> None:
    for la, lb in zip(a.layers, b.layers):
        assert la.offset == lb.offset and la.base == lb.base and len(la.sealed) == len(lb.sealed)
        for x, y in zip(la.span(0, la.offset), lb.span(0, lb.offset)):
            assert np.array_equal(np.array(x), np.array(y))


def test_the_tiny_llama_gets_the_fused_step(lm, monkeypatch):
    assert fused_step_active(lm.model)
    monkeypatch.setenv("PARLEY_FUSED_STEP", "0")
    assert not fused_step_active(lm.model)


def test_fused_step_equals_the_per_module_path_across_a_sealed_block(lm, monkeypatch):
    """40 greedy steps from 490 tokens: the 512th token seals a block mid-decode; logits, tokens and every
    cached key and value equal bit for bit."""
    pool = make_pool(lm)
    ids = tokens(490)
    fused, modules = fill(lm, pool, ids), fill(lm, pool, ids)
    got, got_tokens = decode(lm, fused, 7, 40, monkeypatch, fused=True)
    assert plan_of(lm)._bindings.get(fused.layers[0]) is not None  # the fused step did run
    want, want_tokens = decode(lm, modules, 7, 40, monkeypatch, fused=False)
    assert plan_of(lm)._bindings.get(modules.layers[0]) is None
    assert got_tokens == want_tokens
    assert_same(got, want)
    assert fused.n_sealed == modules.n_sealed == 2 and all(layer.compact for layer in fused.layers)
    assert_same_cache(fused, modules)


def test_fused_step_on_a_restored_cache(lm, monkeypatch):
    """A cache saved and read back continues exactly like the live one, fused or not."""
    pool = make_pool(lm)
    live = fill(lm, pool, tokens(700))
    pool.save("conv:1", live, None, "p")
    restored, restored_modules = pool.load("conv:1"), pool.load("conv:1")
    assert all(layer.compact for layer in restored.layers)
    ours, our_tokens = decode(lm, restored, 11, 30, monkeypatch, fused=True)
    theirs, _ = decode(lm, live, 11, 30, monkeypatch, fused=True)
    modules, module_tokens = decode(lm, restored_modules, 11, 30, monkeypatch, fused=False)
    assert_same(ours, theirs)
    assert_same(ours, modules)
    assert our_tokens == module_tokens


def test_prefill_trim_and_save_between_steps_rebind(lm, monkeypatch):
    """Anything that replaces a cache's tail between steps (a prefill chunk, a trim into a sealed block, a
    save's fp16 rounding) is followed by the same values as the per-module path."""
    pool = make_pool(lm)
    ids = tokens(300)
    a, b = fill(lm, pool, ids), fill(lm, pool, ids)
    for cache, fused in ((a, True), (b, False)):
        decode(lm, cache, 5, 5, monkeypatch, fused)
        more = tokens(40, seed=3)
        mx.eval(lm.model(mx.array([more]), cache=cache.layers))
        cache.appended(more)
        decode(lm, cache, 6, 5, monkeypatch, fused)
        cache.trim_to(200)  # back into the first sealed block
        decode(lm, cache, 8, 5, monkeypatch, fused)
        pool.save(f"conv:{int(fused)}", cache, None, "p")  # rounds the tails to fp16 in place
    got, _ = decode(lm, a, 9, 10, monkeypatch, fused=True)
    want, _ = decode(lm, b, 9, 10, monkeypatch, fused=False)
    assert_same(got, want)
    assert_same_cache(a, b)


def test_a_tail_written_elsewhere_between_steps_is_bound_again(lm, monkeypatch):
    """A save's fp16 rounding writes the tails in place at the same offset; with another array sharing a
    tail's data MLX writes a copy, so the kernel must not keep writing where the tail used to be."""
    from app.kvstore.live_cache import SealingKVCache

    pool = make_pool(lm)
    ids = tokens(300)
    a, b = fill(lm, pool, ids), fill(lm, pool, ids)
    decode(lm, a, 5, 3, monkeypatch, fused=True)
    decode(lm, b, 5, 3, monkeypatch, fused=False)
    held = [(c.keys[..., :1, :], c.values[..., :1, :]) for c in a.layers + b.layers]
    mx.eval(held)  # views of the tails' data: the rounding below cannot write in place
    SealingKVCache.round_tails_to_fp16(a.layers)
    SealingKVCache.round_tails_to_fp16(b.layers)
    got, _ = decode(lm, a, 9, 10, monkeypatch, fused=True)
    want, _ = decode(lm, b, 9, 10, monkeypatch, fused=False)
    assert_same(got, want)
    assert_same_cache(a, b)


def test_caches_that_are_not_compact_take_the_model_path(lm, monkeypatch):
    monkeypatch.setenv("PARLEY_KV_COMPACT", "0")
    pool = make_pool(lm)
    ids = tokens(260)
    a, b = fill(lm, pool, ids), fill(lm, pool, ids)
    got, _ = decode(lm, a, 3, 6, monkeypatch, fused=True)
    assert plan_of(lm)._bindings.get(a.layers[0]) is None
    want, _ = decode(lm, b, 3, 6, monkeypatch, fused=False)
    assert_same(got, want)


@pytest.fixture(params=cpu_kernels.VARIANTS)
def variant(request, lm):
    """Every kernel, the fused step included, as one variant (restored afterwards)."""
    info = cpu_kernels.variants()[request.param]
    if not info["usable"]:
        pytest.skip(f"this CPU cannot run the {request.param} variant (it has: {cpu_kernels.cpu_features()})")
    before = cpu_kernels.active_variant()
    cpu_kernels.use_variant(request.param)
    yield request.param
    cpu_kernels.use_variant(before)


def test_each_kernel_variant(lm, variant, monkeypatch):
    pool = make_pool(lm)
    ids = tokens(BLOCK_TOKENS - 6)
    a, b = fill(lm, pool, ids), fill(lm, pool, ids)
    got, got_tokens = decode(lm, a, 4, 12, monkeypatch, fused=True)
    want, want_tokens = decode(lm, b, 4, 12, monkeypatch, fused=False)
    assert got_tokens == want_tokens
    assert_same(got, want)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_zoo_llamas_llama3_rope_and_untied_head(arch, tmp_path, monkeypatch):
    """The zoo's llama has llama3 rope scaling (cos/sin from its own rope module), mistral an lm_head."""
    from app.model.tiny_zoo import build_tiny_arch

    lm = load_model(str(build_tiny_arch(tmp_path / arch, arch, quant="q4g32")))
    assert fused_step_active(lm.model)
    pool = make_pool(lm)
    ids = tokens(250)
    a, b = fill(lm, pool, ids), fill(lm, pool, ids)
    got, got_tokens = decode(lm, a, 4, 12, monkeypatch, fused=True)
    want, want_tokens = decode(lm, b, 4, 12, monkeypatch, fused=False)
    assert got_tokens == want_tokens
    assert_same(got, want)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma3_text"])
def test_other_architectures_keep_their_own_path(arch, tmp_path):
    """Biases (qwen2), q/k norms (qwen3), sliding windows and other blocks (gemma3): no fused step; the
    model's class is left as it was."""
    from app.model.tiny_zoo import build_tiny_arch

    lm = load_model(str(build_tiny_arch(tmp_path / arch, arch, quant="q4g32")))
    assert not isinstance(lm.model, FusedStepModel) and not fused_step_active(lm.model)
    assert FusedPlan.of(lm.model) is None


def test_a_llama_without_quantized_weights_keeps_its_own_path(tmp_path):
    from app.model.tiny_zoo import build_tiny_arch

    lm = load_model(str(build_tiny_arch(tmp_path / "llama16", "llama", quant="fp16")))
    assert not fused_step_active(lm.model)


@pytest.mark.real_model
def test_embedded_model_fused_equals_per_module(embedded_model_dir, monkeypatch):
    """SmolLM2-135M: 40 greedy steps from a 250-token prompt (the 256th token seals a block), bitwise."""
    lm = load_model(str(embedded_model_dir))
    assert fused_step_active(lm.model)
    ids = lm.tokenizer.encode("The captain of the ship looked at the storm and said: " * 20)[:250]
    pool = make_pool(lm)
    a, b = fill(lm, pool, ids, chunk=256), fill(lm, pool, ids, chunk=256)
    got, got_tokens = decode(lm, a, ids[-1], 40, monkeypatch, fused=True)
    want, want_tokens = decode(lm, b, ids[-1], 40, monkeypatch, fused=False)
    assert got_tokens == want_tokens
    if not all(np.array_equal(x, y) for x, y in zip(got, want)):  # which run was off? a third one says
        again, _ = decode(lm, fill(lm, pool, ids, chunk=256), ids[-1], 40, monkeypatch, fused=False)
        same = [name for name, run in (("fused", got), ("per-module", want))
                if all(np.array_equal(x, y) for x, y in zip(again, run))]
        off = [i for i, (x, y) in enumerate(zip(got, want)) if not np.array_equal(x, y)]
        print(f"steps {off} differ; a second per-module run equals the {same or 'neither'} run")
    assert_same(got, want)
    assert a.n_sealed == 1


def test_bench_speed_decodes_over_the_apps_cache_with_the_fused_step(lm, monkeypatch):
    """`parley bench speed` times decode over the engine's own cache and says whether the fused step ran."""
    from argparse import Namespace

    from app.bench import get_part

    args = Namespace(quick=True, context=300, chunk=128, repeats=1, decode_tokens=4, kv_scheme="q4")
    result = get_part("speed")(lm, args)
    assert result["decode_cache"] == "q4 sealing cache, compact" and result["fused_decode_step"] is True
    assert result["decode_tokens_per_s"] > 0
    monkeypatch.setenv("PARLEY_FUSED_STEP", "0")
    assert get_part("speed")(lm, args)["fused_decode_step"] is False


def test_rope_table_rows_equal_the_rope_of_one_position(lm):
    """The fused step's cos/sin table (one rope call per 256 positions) holds, position by position, what the
    model's rope gives for that position alone."""
    plan = plan_of(lm)
    for offset in (0, 1, 255, 256, 300, 4095, 70000):
        plan._rope_table = (None, 0)
        table_row = plan._rope_cs(offset)
        for later in (offset, offset + 17, offset + 255):
            assert np.array_equal(plan._rope_cs(later), plan._rope_at(later)), (offset, later)
        assert np.array_equal(table_row, plan._rope_at(offset))
    assert plan._rope_rows == 256  # the table's self-check passed
