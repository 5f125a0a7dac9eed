"""The decode attention over encoded blocks (app/csrc/q4_attention.c) against a numpy reference.

The reference decodes every block with `scheme.decode` (the numbers the fp32 working copy held),
appends the tail and attends in float64; the kernel must agree within fp32 rounding, for every
instruction-set variant, over shapes, GQA ratios, block counts and lengths (channel groups that
straddle a block's end), tail lengths (0 included) and tail buffers with headroom (head strides).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.kvstore import block_attention as ba
from app.kvstore.schemes import SCHEMES, KVScheme, TensorQuant

needs_c = pytest.mark.skipif(ba.kernels() is None, reason="no C compiler / PARLEY_CPU_KERNELS=0")

TEST_SCHEMES = {
    **SCHEMES,
    "tok32-ch16": KVScheme("tok32-ch16", TensorQuant(bits=4, axis="token", group=32),
                           TensorQuant(bits=8, axis="channel", group=16)),
    "ch8-tok8": KVScheme("ch8-tok8", TensorQuant(bits=8, axis="channel", group=8),
                         TensorQuant(bits=4, axis="token", group=8)),
}


def isas() -> list[int]:
    lib = ba.kernels()
    return [ba.ISA_PORTABLE] + ([ba.ISA_AVX2] if lib is not None and lib.kvq_has_avx2() else [])


def reference(scheme, blocks, tail_k, tail_v, q, scale) -> np.ndarray:
    """Dequantize-then-attend in float64: softmax(scale q K^T) V, query head h on KV head h // G."""
    parts = [scheme.decode(b, mx.float32) for b in blocks]
    ks = [np.asarray(k) for k, _ in parts] + [tail_k]
    vs = [np.asarray(v) for _, v in parts] + [tail_v]
    k = np.concatenate(ks, axis=1).astype(np.float64)
    v = np.concatenate(vs, axis=1).astype(np.float64)
    hkv = k.shape[0]
    qh = q.astype(np.float64).reshape(-1, k.shape[2])
    g = qh.shape[0] // hkv
    out = []
    for h in range(qh.shape[0]):
        s = scale * (k[h // g] @ qh[h])
        p = np.exp(s - s.max())
        out.append((p / p.sum()) @ v[h // g])
    return np.concatenate(out)


def synced_case(scheme, hkv, group, dims, block_lens, n_tail, headroom, seed):
    """A random case (at least one token) and the kernel's table over its blocks, None where the table refuses
    them: (blocks, table, tail_k, tail_v, q, n_tail)."""
    dk, dv = dims
    if not block_lens and n_tail == 0:
        n_tail = 1
    blocks, tail_k, tail_v, q = make_case(scheme, hkv, group, dk, dv, block_lens, n_tail, headroom, seed)
    table = ba.BlockTable(scheme, hkv, dk, dv)
    try:
        table.sync(blocks)
    except ba.Unsupported:
        table = None
    return blocks, table, tail_k, tail_v, q, n_tail


def make_case(scheme, hkv, group, dk, dv, block_lens, n_tail, headroom, seed):
    rng = np.random.default_rng(seed)
    blocks = []
    for t in block_lens:
        k = (rng.standard_normal((hkv, t, dk)) * np.where(np.arange(dk) % 7 == 3, 6.0, 1.0)).astype(np.float32)
        v = (rng.standard_normal((hkv, t, dv)) * 2).astype(np.float32)
        blocks.append(scheme.encode(mx.array(k), mx.array(v)))
    cap = n_tail + headroom
    tail_k = (rng.standard_normal((hkv, cap, dk))).astype(np.float32)
    tail_v = (rng.standard_normal((hkv, cap, dv))).astype(np.float32)
    q = (rng.standard_normal(hkv * group * dk) * 0.5).astype(np.float32)
    return blocks, tail_k, tail_v, q


@needs_c
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(TEST_SCHEMES)), hkv=st.integers(1, 3), group=st.sampled_from([1, 2, 3, 4]),
       dims=st.sampled_from([(64, 64), (32, 32), (64, 32), (16, 64)]),
       block_lens=st.lists(st.sampled_from([1, 8, 17, 64, 70]), max_size=3),
       n_tail=st.sampled_from([0, 1, 5, 63, 64, 65]), headroom=st.sampled_from([0, 3]),
       seed=st.integers(0, 2**16))
def test_kernel_matches_dequantize_then_attend(name, hkv, group, dims, block_lens, n_tail, headroom, seed):
    scheme = TEST_SCHEMES[name]
    dk, dv = dims
    blocks, table, tail_k, tail_v, q, n_tail = synced_case(scheme, hkv, group, dims, block_lens, n_tail, headroom, seed)
    if table is None:
        # blocks of different lengths with a channel-axis scheme have different groups: refused, never wrong
        assert len(set(block_lens)) > 1
        return
    scale = dk ** -0.5
    want = reference(scheme, blocks, tail_k[:, :n_tail], tail_v[:, :n_tail], q, scale)
    for isa in isas():
        got = ba.attend(table, q, tail_k if n_tail else None, tail_v if n_tail else None, n_tail, scale, isa=isa)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=f"isa {isa}")


@needs_c
def test_variants_agree_on_a_long_cache():
    """32 blocks of 256 tokens (8K) with GQA 3: both variants within fp32 rounding of the reference."""
    scheme = SCHEMES["q4"]
    blocks, tail_k, tail_v, q = make_case(scheme, 3, 3, 64, 64, [256] * 32, 100, 156, 7)
    table = ba.BlockTable(scheme, 3, 64, 64)
    table.sync(blocks)
    want = reference(scheme, blocks, tail_k[:, :100], tail_v[:, :100], q, 0.125)
    for isa in isas():
        got = ba.attend(table, q, tail_k, tail_v, 100, 0.125, isa=isa)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


@needs_c
def test_table_follows_sealing_and_trims():
    scheme = SCHEMES["q4"]
    blocks, *_ = make_case(scheme, 2, 1, 64, 64, [64, 64, 64], 0, 0, 3)
    table = ba.BlockTable(scheme, 2, 64, 64)
    table.sync(blocks[:2])
    first = table.rows.copy()
    table.sync(blocks)
    assert table.rows.shape == (3, 8) and (table.rows[:2] == first).all() and table.tokens == 192
    table.sync(blocks[:1])
    assert table.rows.shape == (1, 8) and table.tokens == 64


def test_schemes_the_kernel_refuses():
    """Rotation, centering and outliers are not the kernel's math: those caches keep the fp32 working copy."""
    assert ba.scheme_applies(SCHEMES["q4"]) and ba.scheme_applies(SCHEMES["f16"])
    for quant in (TensorQuant(rotate=True), TensorQuant(center=True), TensorQuant(outliers=2), TensorQuant(bits=2)):
        assert not ba.scheme_applies(KVScheme("x", quant, TensorQuant()))


# ---------------------------------------------------------------- threads (app/csrc/threads.c)


def usable_variants() -> list[str]:
    from app.model import cpu_kernels

    return [name for name, v in cpu_kernels.variants().items() if v["usable"]]


@needs_c
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(TEST_SCHEMES)), hkv=st.integers(1, 3), group=st.sampled_from([1, 2, 3, 4, 5, 8]),
       dims=st.sampled_from([(64, 64), (32, 32), (64, 32), (16, 64), (128, 128), (8, 8)]),
       block_lens=st.lists(st.sampled_from([1, 8, 17, 64, 70, 256]), max_size=3),
       n_tail=st.sampled_from([0, 1, 5, 63, 64, 65]), headroom=st.sampled_from([0, 3]), threads=st.integers(2, 4),
       seed=st.integers(0, 2**16))
def test_threaded_kernel_is_bitwise_one_thread(name, hkv, group, dims, block_lens, n_tail, headroom, threads, seed):
    """Scores split by KV head and block, softmax by query head, values by channel slice: every output
    bitwise the one-thread kernel's, for each kernel variant this CPU runs and each ISA path."""
    from app.model import cpu_kernels

    dk, _ = dims
    _, table, tail_k, tail_v, q, n_tail = synced_case(TEST_SCHEMES[name], hkv, group, dims, block_lens, n_tail,
                                                     headroom, seed)
    if table is None:
        return
    tails = (tail_k, tail_v) if n_tail else (None, None)
    before, work, variant = cpu_kernels.threads(), cpu_kernels.set_min_work(0), cpu_kernels.active_variant()
    try:
        for variant_name in usable_variants():
            cpu_kernels.use_variant(variant_name)
            for isa in isas():
                cpu_kernels.set_threads(1)
                want = ba.attend(table, q, *tails, n_tail, dk ** -0.5, isa=isa)
                cpu_kernels.set_threads(threads)
                got = ba.attend(table, q, *tails, n_tail, dk ** -0.5, isa=isa)
                assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (variant_name, isa)
    finally:
        cpu_kernels.set_threads(before)
        cpu_kernels.set_min_work(work)
        cpu_kernels.use_variant(variant)


@needs_c
def test_the_helper_thread_really_runs_attention_chunks():
    """A 4K-token cache attended until the helper has run some chunks (bounded), each bitwise one thread."""
    from app.model import cpu_kernels

    scheme = SCHEMES["q4"]
    blocks, tail_k, tail_v, q = make_case(scheme, 3, 3, 64, 64, [256] * 16, 40, 0, 11)
    table = ba.BlockTable(scheme, 3, 64, 64)
    table.sync(blocks)
    before = cpu_kernels.threads()
    try:
        cpu_kernels.set_threads(1)
        want = ba.attend(table, q, tail_k, tail_v, 40, 0.125)
        cpu_kernels.set_threads(2)
        chunks = cpu_kernels.pool_stats()["helper_chunks"]
        for _ in range(1000):
            assert np.array_equal(ba.attend(table, q, tail_k, tail_v, 40, 0.125), want)
            if cpu_kernels.pool_stats()["helper_chunks"] > chunks:
                break
        assert cpu_kernels.pool_stats()["helper_chunks"] > chunks, "the helper thread never ran a chunk"
    finally:
        cpu_kernels.set_threads(before)
