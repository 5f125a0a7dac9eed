"""app.model.cpu_linear: quantized layers expanded to fp32 only when BLAS needs them.

The reference is the eager rewrite Parley did before: every quantized layer replaced at load time by an fp32
nn.Linear / nn.Embedding dequantized with fp32 scales (written out here, independent of the code under test).
Long inputs must give that reference's logits and cache bit for bit; short ones (the 4-bit kernels) within fp32
rounding; and a short turn must build no fp32 copy at all.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_unflatten
from mlx_lm.models.cache import make_prompt_cache

from app.model import cpu_kernels, cpu_linear
from app.model.cpu_fast import prefill_logits, speed_up_for_cpu
from app.model.host_exec import Q4Weights
from app.model.loader import load_model


class EagerLinear(nn.Linear):
    """The eager rewrite's fp32 Linear: BLAS on the fp32 weight, the 4/8-bit gemv for a single row."""

    def __call__(self, x):
        q4 = self.__dict__.get("_q4")
        if q4 is not None and x.size == q4.K:
            y = q4(x)
            return y + self.bias if "bias" in self else y
        return super().__call__(x)


class EagerEmbedding(nn.Embedding):
    """The eager rewrite's fp32 Embedding: its tied head through the gemv for a single row."""

    def as_linear(self, x):
        q4 = self.__dict__.get("_q4")
        if q4 is not None and x.size == q4.K:
            return q4(x)
        return super().as_linear(x)


def eager_fp32_model(folder):
    """The model as the eager rewrite made it: fp32 copies of every quantized layer built at load time."""
    lm = load_model(str(folder), fast_cpu=False)
    replacements = []
    for name, m in lm.model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(m.weight, m.scales.astype(mx.float32), m.biases.astype(mx.float32),
                              m.group_size, m.bits).astype(mx.float32)
            if isinstance(m, nn.QuantizedEmbedding):
                fp32 = EagerEmbedding(w.shape[0], w.shape[1])
            else:
                fp32 = EagerLinear(w.shape[1], w.shape[0], bias="bias" in m)
                if "bias" in m:
                    fp32.bias = m.bias.astype(mx.float32)
            fp32.weight = w
            if Q4Weights.usable(m):
                object.__setattr__(fp32, "_q4", Q4Weights.of(m))
            replacements.append((name, fp32))
    lm.model.update_modules(tree_unflatten(replacements))
    speed_up_for_cpu(lm.model)  # attention/MLP/block kernels as before; no quantized layer is left to retype
    return lm


def run_prefill(lm, ids, decode: int = 0):
    """Last-position logits of a prefill of `ids`, then of `decode` one-token steps; and the cache's keys."""
    cache = make_prompt_cache(lm.model)
    logits = [prefill_logits(lm.model, mx.array([ids]), cache)]
    for t in ids[:decode]:
        logits.append(lm.model(mx.array([[t]]), cache=cache))
    mx.eval(logits)
    return np.concatenate([np.array(x) for x in logits], axis=1), [np.array(c.state[0]) for c in cache]


def long_ids(lm, n):
    rng = np.random.default_rng(0)
    return [int(t) for t in rng.integers(0, lm.tokenizer.vocab_size, n)]


def test_loading_builds_no_fp32_copy(tiny_model_dir):
    before = cpu_linear.EXPANDED["layers"]
    lm = load_model(str(tiny_model_dir))
    kinds = (cpu_linear.CpuLinear, cpu_linear.CpuEmbedding)
    quantized = [m for _, m in lm.model.named_modules() if isinstance(m, kinds)]
    assert quantized and all(m.__dict__["_fp32"] is None for m in quantized)
    assert cpu_linear.EXPANDED["layers"] == before


def test_long_prefill_is_bitwise_the_eager_fp32_model_and_expands_each_layer_once(tiny_model_dir):
    lm, ref = load_model(str(tiny_model_dir)), eager_fp32_model(tiny_model_dir)
    ids = long_ids(lm, 3 * cpu_linear.SHORT_ROWS + 5)
    before = cpu_linear.EXPANDED["layers"]
    got, got_keys = run_prefill(lm, ids, decode=4)
    want, want_keys = run_prefill(ref, ids, decode=4)
    assert (got == want).all()  # the prefill and the decode steps after it
    assert all((a == b).all() for a, b in zip(got_keys, want_keys))
    layers = sum(isinstance(m, cpu_linear.CpuLinear) for _, m in lm.model.named_modules())
    # every linear layer once; the tied embedding only as the head, which prefill_logits runs on one row
    assert cpu_linear.EXPANDED["layers"] - before == layers
    run_prefill(lm, ids)
    assert cpu_linear.EXPANDED["layers"] - before == layers  # kept: a second long prefill builds nothing


def test_the_c_dequantizer_builds_the_fp32_copies_bitwise(tiny_model_dir):
    """Every quantized layer of the tiny model goes through app/csrc/dequant.c, to MLX's dequantize's bits."""
    if cpu_kernels.kernels() is None:
        pytest.skip("the C kernels are off or not built")
    lm = load_model(str(tiny_model_dir))
    layers = [m for _, m in lm.model.named_modules() if isinstance(m, (cpu_linear.CpuLinear, cpu_linear.CpuEmbedding))]
    for m in layers:
        got = cpu_linear.dequantized_in_c(m)
        assert got is not None
        want = mx.dequantize(m.weight, m.scales.astype(mx.float32), m.biases.astype(mx.float32), m.group_size, m.bits)
        assert np.array_equal(np.array(got).view(np.uint32), np.array(want).view(np.uint32))


@pytest.mark.parametrize("rows", [2, 7, 8, 9, cpu_linear.SHORT_ROWS])
def test_short_prefill_builds_nothing_and_stays_within_fp32_rounding(tiny_model_dir, rows):
    lm, ref = load_model(str(tiny_model_dir)), eager_fp32_model(tiny_model_dir)
    if lm.model.model.layers[0].self_attn.q_proj.__dict__.get("_q4") is None:
        pytest.skip("no 4-bit kernels here (portable variant or no compiler): short inputs use the fp32 copies")
    ids = long_ids(lm, rows)
    before = cpu_linear.EXPANDED["layers"]
    got, got_keys = run_prefill(lm, ids)
    assert cpu_linear.EXPANDED["layers"] == before
    want, want_keys = run_prefill(ref, ids)
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want).max() <= 2e-5 * scale
    for a, b in zip(got_keys, want_keys):
        assert np.abs(a - b).max() <= 2e-5 * max(1.0, float(np.abs(b).max()))


@pytest.mark.parametrize("rows", [1, 3, 8, 13])
def test_each_short_layer_call_is_the_fp32_product_within_rounding(tiny_model_dir, rows):
    lm = load_model(str(tiny_model_dir))
    layer = lm.model.model.layers[0].mlp.down_proj
    if layer.__dict__.get("_q4") is None:
        pytest.skip("no 4-bit kernels here")
    x = mx.random.normal((1, rows, layer.__dict__["_q4"].K), key=mx.random.key(rows))
    got = np.array(layer(x))
    want = np.array(x @ cpu_linear.dequantized(layer).T)
    assert got.shape == want.shape == (1, rows, layer.__dict__["_q4"].O)
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))


def test_embedding_rows_looked_up_before_expansion_are_the_fp32_copy_bitwise(tiny_model_dir):
    lm = load_model(str(tiny_model_dir))
    embed = lm.model.model.embed_tokens
    ids = mx.array([[0, 5, 17, lm.tokenizer.vocab_size - 1, 5]])
    lazy = np.array(embed(ids))
    assert embed.__dict__["_fp32"] is None
    assert (lazy == np.array(cpu_linear.fp32_weight(embed)[ids])).all()
    assert (np.array(embed(ids)) == lazy).all()  # after expansion: looked up in the copy, same values


def test_without_the_4bit_kernels_every_input_uses_the_fp32_copy(tiny_model_dir):
    k = cpu_kernels.kernels()
    if k is None or not cpu_kernels.variants()["portable"]["built"]:
        pytest.skip("the C kernels are off or the portable variant is not built")
    before_variant = cpu_kernels.active_variant()
    cpu_kernels.use_variant("portable")
    try:
        lm, ref = load_model(str(tiny_model_dir)), eager_fp32_model(tiny_model_dir)
        ids = long_ids(lm, 5)
        got, _ = run_prefill(lm, ids)
        want, _ = run_prefill(ref, ids)
        assert (got == want).all()
    finally:
        cpu_kernels.use_variant(before_variant)


@pytest.mark.real_model
def test_embedded_model_short_and_long_prefill_against_the_eager_fp32_model(embedded_model_dir):
    lm, ref = load_model(str(embedded_model_dir)), eager_fp32_model(embedded_model_dir)
    for n in (10, 3 * cpu_linear.SHORT_ROWS):
        ids = long_ids(lm, n)
        got, _ = run_prefill(lm, ids)
        want, _ = run_prefill(ref, ids)
        if n > cpu_linear.SHORT_ROWS:
            assert (got == want).all()
        else:
            assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))
            assert got.argmax() == want.argmax()
