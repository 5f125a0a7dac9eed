"""A short prefill chunk's attention straight over encoded blocks (app/csrc/q4_attention_rows.c,
`block_attention.attend_rows`, used by `CpuAttention` for causal chunks of up to `SHORT_CHUNK_ROWS` rows over a
compact cache): against a float64 dequantize-then-attend reference over schemes, GQA ratios, head sizes, block
lengths and tails (the chunk partly sealed into the last block, or filling it exactly), for every kernel variant
this CPU runs and both ISA paths; bitwise the same on 1 and 2+ threads; and on the tiny model, a resumed
conversation's question gives logits within fp32 rounding of the decoded-scratch path, restored equal to live.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.kvstore import block_attention as ba
from app.kvstore.live_cache import BLOCK_TOKENS, SealingKVCache
from app.kvstore.schemes import SCHEMES
from app.model.cpu_attention import SHORT_CHUNK_ROWS
from app.model.loader import load_model
from tests.kv_helpers import fill, make_pool, tokens
from tests.test_block_attention import TEST_SCHEMES, isas, make_case, usable_variants

needs_c = pytest.mark.skipif(ba.kernels() is None, reason="no C compiler / PARLEY_CPU_KERNELS=0")


def reference_rows(scheme, blocks, tail_k, tail_v, q, scale) -> np.ndarray:
    """float64: row l of q (H, L, D) sees positions [0, total - L + l]; output (L, H * Dv)."""
    parts = [scheme.decode(b, mx.float32) for b in blocks]
    k = np.concatenate([np.asarray(a) for a, _ in parts] + [tail_k], axis=1).astype(np.float64)
    v = np.concatenate([np.asarray(b) for _, b in parts] + [tail_v], axis=1).astype(np.float64)
    hkv, total = k.shape[0], k.shape[1]
    H, L = q.shape[0], q.shape[1]
    out = np.zeros((L, H, v.shape[2]))
    for h in range(H):
        for l in range(L):
            n = total - L + l + 1
            s = scale * (k[h // (H // hkv), :n] @ q[h, l].astype(np.float64))
            p = np.exp(s - s.max())
            out[l, h] = (p / p.sum()) @ v[h // (H // hkv), :n]
    return out.reshape(L, -1)


def rows_case(name, hkv, group, dims, block_lens, n_tail, rows, headroom, seed):
    """(blocks, table or None, tail_k, tail_v, q (H, L, dk), n_tail, L): L <= every position."""
    scheme = TEST_SCHEMES[name]
    dk, dv = dims
    L = max(1, min(rows, sum(block_lens) + n_tail))
    if sum(block_lens) + n_tail < L:
        n_tail = L
    blocks, tail_k, tail_v, _ = make_case(scheme, hkv, group, dk, dv, block_lens, n_tail, headroom, seed)
    q = (np.random.default_rng(seed + 1).standard_normal((hkv * group, L, dk)) * 0.5).astype(np.float32)
    table = ba.BlockTable(scheme, hkv, dk, dv)
    try:
        table.sync(blocks)
    except ba.Unsupported:
        table = None
    return blocks, table, tail_k, tail_v, q, n_tail, L


@needs_c
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(TEST_SCHEMES)), hkv=st.integers(1, 3), group=st.sampled_from([1, 2, 3, 4, 5]),
       dims=st.sampled_from([(64, 64), (32, 32), (64, 32), (16, 64), (8, 8)]),
       block_lens=st.lists(st.sampled_from([1, 8, 17, 64, 70, 256]), max_size=3),
       n_tail=st.sampled_from([0, 1, 5, 9, 33]), rows=st.sampled_from([1, 2, 7, 8, 9, 21, 32]),
       headroom=st.sampled_from([0, 3]), threads=st.integers(2, 3), seed=st.integers(0, 2**16))
def test_rows_kernel_matches_the_reference_and_is_bitwise_on_threads(name, hkv, group, dims, block_lens, n_tail, rows,
                                                                     headroom, threads, seed):
    """Every variant this CPU runs, both ISA paths: within fp32 rounding of the float64 reference; 1 thread and
    `threads` threads bitwise equal. The chunk's rows may lie partly in the last block (n_tail < L)."""
    from app.model import cpu_kernels

    blocks, table, tail_k, tail_v, q, n_tail, L = rows_case(name, hkv, group, dims, block_lens, n_tail, rows,
                                                            headroom, seed)
    if table is None:
        assert len(set(block_lens)) > 1  # channel groups differ between blocks: refused, never wrong
        return
    scale = dims[0] ** -0.5
    want = reference_rows(TEST_SCHEMES[name], blocks, tail_k[:, :n_tail], tail_v[:, :n_tail], q, scale)
    tails = (tail_k, tail_v) if n_tail else (None, None)
    before, work, variant = cpu_kernels.threads(), cpu_kernels.set_min_work(0), cpu_kernels.active_variant()
    try:
        for variant_name in usable_variants():
            cpu_kernels.use_variant(variant_name)
            for isa in isas():
                cpu_kernels.set_threads(1)
                one = ba.attend_rows(table, q, *tails, n_tail, scale, isa=isa)
                np.testing.assert_allclose(one, want, rtol=2e-5, atol=2e-6, err_msg=f"{variant_name} isa {isa}")
                cpu_kernels.set_threads(threads)
                more = ba.attend_rows(table, q, *tails, n_tail, scale, isa=isa)
                assert np.array_equal(one.view(np.uint32), more.view(np.uint32)), (variant_name, isa)
    finally:
        cpu_kernels.set_threads(before)
        cpu_kernels.set_min_work(work)
        cpu_kernels.use_variant(variant)


@needs_c
def test_a_question_over_a_4k_cache_matches_the_reference():
    """The resume's shape: SmolLM2's 9 query heads over 3 KV heads, 16 blocks of 256 plus a tail, 21 rows."""
    scheme = SCHEMES["q4"]
    blocks, tail_k, tail_v, _ = make_case(scheme, 3, 3, 64, 64, [256] * 16, 65, 100, 5)
    q = (np.random.default_rng(9).standard_normal((9, 21, 64)) * 0.5).astype(np.float32)
    table = ba.BlockTable(scheme, 3, 64, 64)
    table.sync(blocks)
    want = reference_rows(scheme, blocks, tail_k[:, :65], tail_v[:, :65], q, 0.125)
    for isa in isas():
        np.testing.assert_allclose(ba.attend_rows(table, q, tail_k, tail_v, 65, 0.125, isa=isa), want,
                                   rtol=2e-5, atol=2e-6)


def test_more_rows_than_positions_is_refused():
    if ba.kernels() is None:
        pytest.skip("no C kernels")
    scheme = SCHEMES["q4"]
    blocks, tail_k, tail_v, _ = make_case(scheme, 1, 2, 64, 64, [], 3, 0, 1)
    table = ba.BlockTable(scheme, 1, 64, 64)
    table.sync(blocks)
    with pytest.raises(ba.Unsupported):
        ba.attend_rows(table, np.zeros((2, 4, 64), np.float32), tail_k, tail_v, 3, 0.125)


# ---------------------------------------------------------------- on the tiny model


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def chunk_logits(lm, cache, ids: list[int]) -> np.ndarray:
    out = lm.model(mx.array([ids]), cache=cache.layers)
    mx.eval(out)
    cache.appended(ids)
    return np.array(out)


def scratch_path(monkeypatch) -> None:
    """What a short chunk over a compact cache did before: blocks decoded into the shared scratch, BLAS."""
    monkeypatch.delattr(SealingKVCache, "attend_rows")


@needs_c
@pytest.mark.parametrize("before, chunk", [(300, 21), (250, 20), (240, 16), (512, 32), (40, 9), (700, 2)])
def test_short_chunk_is_the_scratch_path_within_fp32_rounding(lm, monkeypatch, before, chunk):
    """(250, 20): a block seals inside the chunk; (240, 16): the chunk fills its block exactly (empty tail);
    (512, 32): the tail was empty, the longest short chunk; (40, 9): no sealed block at all."""
    pool = make_pool(lm)
    ids, more = tokens(before), tokens(chunk, seed=3)
    calls = []
    real = SealingKVCache.attend_rows

    def counted(self, *a, **k):
        out = real(self, *a, **k)
        calls.append(out is not None)
        return out

    with monkeypatch.context() as m:
        m.setattr(SealingKVCache, "attend_rows", counted)
        new = fill(lm, pool, ids)
        got = chunk_logits(lm, new, more)
    assert calls and all(calls), "the short chunk did not attend over the encoded blocks"
    with monkeypatch.context() as m:
        scratch_path(m)
        old = fill(lm, pool, ids)
        want = chunk_logits(lm, old, more)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.array_equal(got.argmax(-1), want.argmax(-1))
    assert all(layer.compact for layer in new.layers)
    assert new.n_sealed == old.n_sealed == (before + chunk) // BLOCK_TOKENS
    for la, lb in zip(new.layers, old.layers):
        for x, y in zip(la.span(0, la.offset), lb.span(0, lb.offset)):
            np.testing.assert_allclose(np.array(x), np.array(y), rtol=1e-4, atol=1e-4)


@needs_c
def test_a_restored_cache_answers_a_question_exactly_like_the_live_one(lm):
    pool = make_pool(lm)
    live = fill(lm, pool, tokens(700))
    pool.save("conv:1", live, None, "p")
    restored = pool.load("conv:1")
    question = tokens(21, seed=8)
    assert len(question) <= SHORT_CHUNK_ROWS
    assert np.array_equal(chunk_logits(lm, restored, question), chunk_logits(lm, live, question))
    follow = tokens(60, seed=9)[:30]  # a second short chunk, crossing the 768 boundary
    assert np.array_equal(chunk_logits(lm, restored, follow), chunk_logits(lm, live, follow))
    for la, lb in zip(restored.layers, live.layers):
        for x, y in zip(la.span(0, la.offset), lb.span(0, lb.offset)):
            assert np.array_equal(np.array(x), np.array(y))


@needs_c
def test_the_fallback_after_appending_attends_every_position(lm):
    """If the kernel refuses once the chunk is appended, MLX attends over the decoded positions instead:
    the same numbers as the scratch path, within fp32 rounding (nothing appended twice)."""
    pool = make_pool(lm)
    ids, more = tokens(300), tokens(12, seed=4)
    cache = fill(lm, pool, ids)
    layer = cache.layers[0]
    rng = np.random.default_rng(0)
    hkv, d = layer.keys.shape[1], layer.keys.shape[3]
    H = lm.model.args.num_attention_heads
    q = mx.array(rng.standard_normal((1, H, len(more), d)).astype(np.float32))
    k = mx.array(rng.standard_normal((1, hkv, len(more), d)).astype(np.float32))
    twin = fill(lm, pool, ids).layers[0]
    got = twin._append(k, k) or twin._attend_rows_decoded(q, 0.25)
    want = layer.attend_rows(q, k, k, 0.25)
    assert layer.offset == twin.offset == 300 + len(more)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@needs_c
@pytest.mark.parametrize("rows", [2, 9, SHORT_CHUNK_ROWS])
def test_a_short_chunks_qkv_in_one_call_is_bitwise_three(lm, rows):
    """A short chunk's q, k and v come from one row call over the stacked 4-bit weights: each output the same sums as
    its own layer's call."""
    from app.model.cpu_linear import rows_q4

    attn = lm.model.model.layers[0].self_attn
    qkv = attn.__dict__.get("_qkv")
    if qkv is None:
        pytest.skip("no stacked 4-bit q/k/v here")
    x = mx.array(np.random.default_rng(rows).standard_normal((1, rows, qkv.K)).astype(np.float32))
    y = np.array(rows_q4(qkv, x))
    nq, nk = attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]
    for part, layer in zip((y[..., :nq], y[..., nq:nq + nk], y[..., nq + nk:]), (attn.q_proj, attn.k_proj, attn.v_proj)):
        assert np.array_equal(part, np.array(layer(x)))
