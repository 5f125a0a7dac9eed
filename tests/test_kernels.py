"""Every C kernel (app/csrc) against a numpy reference, for every variant this machine runs.

The library holds each kernel three times (AVX-512, AVX2+FMA, portable); `variant` switches the dispatcher
to one of them and skips those the CPU lacks, so the AVX2 and portable bodies are tested on an AVX2
machine and all three on an AVX-512 one. Shapes, GQA ratios, offsets and block boundaries come from
hypothesis. Float kernels are checked to fp32 rounding; the quantized gemv's rows are bitwise the one-row
result; the KV decoder is bitwise (its arithmetic is exact, see app/kvstore/fast_decode.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.model import cpu_kernels

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def ptr(a: np.ndarray) -> int:
    assert a.flags.c_contiguous
    return a.ctypes.data


@pytest.fixture(params=cpu_kernels.VARIANTS)
def variant(request):
    """The kernel library with its dispatcher switched to one variant (restored afterwards)."""
    k = cpu_kernels.kernels()
    if k is None:
        pytest.skip("the C kernels are off or not built")
    info = cpu_kernels.variants()[request.param]
    if not info["built"]:
        pytest.skip(f"the {request.param} variant was not built into this library (it needs GCC on x86-64)")
    if not info["usable"]:
        pytest.skip(f"this CPU cannot run the {request.param} variant (it has: {cpu_kernels.cpu_features()})")
    before = cpu_kernels.active_variant()
    cpu_kernels.use_variant(request.param)
    yield k
    cpu_kernels.use_variant(before)


# ---------------------------------------------------------------- softmax, attention, SiLU


@SETTINGS
@given(L=st.integers(1, 8), groups=st.integers(1, 4), T=st.integers(1, 300), back=st.integers(0, 300),
       causal=st.booleans(), spread=st.floats(0.1, 40.0), seed=st.integers(0, 2**16))
def test_causal_softmax(variant, L, groups, T, back, causal, spread, seed):
    rows = L * groups  # G*L query rows of a KV head, as the GQA prefill lays them out
    offset = max(0, T - L - back % (T + 1))
    s = (np.random.default_rng(seed).standard_normal((rows, T)) * spread).astype(np.float32)
    ref = np.zeros_like(s, dtype=np.float64)
    for r in range(rows):
        n = min(offset + r % L + 1, T) if causal else T
        e = np.exp(s[r, :n].astype(np.float64) - s[r, :n].max())
        ref[r, :n] = e / e.sum()
    variant.causal_softmax(ptr(s), rows, L, T, offset, int(causal))
    np.testing.assert_allclose(s, ref, rtol=2e-5, atol=1e-7)


@SETTINGS
@given(Hkv=st.integers(1, 4), G=st.sampled_from([1, 2, 3, 4, 8]), T=st.integers(1, 300), D=st.sampled_from([8, 24, 64]),
       headroom=st.integers(0, 40), seed=st.integers(0, 2**16))
def test_attn_decode(variant, Hkv, G, T, D, headroom, seed):
    """One query per head over a cache buffer longer than T (heads k_hs floats apart), G query heads a KV head."""
    rng = np.random.default_rng(seed)
    H, cap, scale = Hkv * G, T + headroom, D ** -0.5
    q = rng.standard_normal((H, D)).astype(np.float32)
    k = rng.standard_normal((Hkv, cap, D)).astype(np.float32) * 2
    v = rng.standard_normal((Hkv, cap, D)).astype(np.float32)
    out = np.empty((H, D), np.float32)
    scratch = np.empty(T, np.float32)
    variant.attn_decode(ptr(q), ptr(k), ptr(v), ptr(out), ptr(scratch), H, Hkv, T, D, cap * D, cap * D, scale)
    for h in range(H):
        kv = h // G
        w = scale * (k[kv, :T].astype(np.float64) @ q[h])
        p = np.exp(w - w.max())
        ref = (p / p.sum()) @ v[kv, :T]
        np.testing.assert_allclose(out[h], ref, rtol=1e-4, atol=2e-6)


def attention_reference(q, k, v, offset: int, causal: bool) -> np.ndarray:
    """softmax(q K^T) V per query head in float64: q (H, L, Dk), k (Hkv, T, Dk), v (Hkv, T, Dv); (L, H * Dv)."""
    H, L, _ = q.shape
    Hkv, T, Dv = v.shape
    out = np.zeros((L, H, Dv))
    for h in range(H):
        s = q[h].astype(np.float64) @ k[h // (H // Hkv)].astype(np.float64).T
        if causal:
            s = np.where(np.arange(T)[None, :] > offset + np.arange(L)[:, None], -np.inf, s)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        out[:, h] = (p / p.sum(axis=1, keepdims=True)) @ v[h // (H // Hkv)].astype(np.float64)
    return out.reshape(L, H * Dv)


@SETTINGS
@given(Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 4]), L=st.integers(1, 130), before=st.integers(0, 400),
       dims=st.sampled_from([(64, 64), (16, 16), (32, 48), (8, 24), (128, 128), (20, 12)]), headroom=st.integers(0, 9),
       causal=st.booleans(), spread=st.floats(0.1, 8.0), seed=st.integers(0, 2**16))
def test_prefill_attention(variant, Hkv, G, L, before, dims, headroom, causal, spread, seed):
    """A prefill chunk's attention (query tiles, key blocks and channel tiles with remainders) over keys/values
    in cache buffers longer than T (heads `cap` rows apart), G query heads a KV head, to fp32 rounding."""
    rng = np.random.default_rng(seed)
    (Dk, Dv), H, T = dims, Hkv * G, L + before
    cap = T + headroom
    q = (rng.standard_normal((H, L, Dk)) * spread / Dk ** 0.5).astype(np.float32)
    k = rng.standard_normal((Hkv, cap, Dk)).astype(np.float32)
    v = rng.standard_normal((Hkv, cap, Dv)).astype(np.float32)
    out = np.full((L, H * Dv), np.nan, np.float32)
    assert variant.prefill_attention(ptr(q), ptr(k), ptr(v), ptr(out), H, Hkv, L, T, Dk, Dv, L * Dk, cap * Dk,
                                     cap * Dv, before, int(causal)) == 0
    ref = attention_reference(q, k[:, :T], v[:, :T], before, causal)
    # a score's fp32 rounding (~1e-7 of its terms, |s| up to spread * sqrt(Dk)) moves exp(s) by as much, relative
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-7 * (1 + spread * Dk ** 0.5))


def test_prefill_attention_is_the_same_on_any_thread_count(variant):
    """Chunks are (head, query tile): which thread runs one never changes its numbers."""
    rng = np.random.default_rng(5)
    H, Hkv, L, T, D = 9, 3, 300, 1100, 64
    q = (rng.standard_normal((H, L, D)) / 8).astype(np.float32)
    k, v = (rng.standard_normal((Hkv, T, D)).astype(np.float32) for _ in range(2))
    outs = []
    before = cpu_kernels.threads()
    try:
        for n in (1, 2, 3):
            cpu_kernels.set_threads(n)
            out = np.empty((L, H * D), np.float32)
            variant.prefill_attention(ptr(q), ptr(k), ptr(v), ptr(out), H, Hkv, L, T, D, D, L * D, T * D, T * D,
                                      T - L, 1)
            outs.append(out)
    finally:
        cpu_kernels.set_threads(before)
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


def test_prefill_attention_stays_shared_while_the_pool_backs_off(variant):
    """A stall makes the pool run the next light (decode) jobs alone; the prefill kernels' heavy jobs still share."""
    rng = np.random.default_rng(6)
    H, Hkv, L, T, D = 4, 2, 96, 96, 64
    q, k, v = (rng.standard_normal((n, L, D)).astype(np.float32) for n in (H, Hkv, Hkv))
    out = np.empty((L, H * D), np.float32)
    before = cpu_kernels.threads()
    try:
        cpu_kernels.set_threads(2)
        variant.parley_pool_back_off(1000)
        stats = cpu_kernels.pool_stats()
        variant.prefill_attention(ptr(q), ptr(k), ptr(v), ptr(out), H, Hkv, L, T, D, D, L * D, T * D, T * D, 0, 1)
        after = cpu_kernels.pool_stats()
    finally:
        cpu_kernels.set_threads(before)  # also ends the backoff
    assert after["shared"] == stats["shared"] + 1 and after["alone"] == stats["alone"]


@SETTINGS
@given(bits=st.sampled_from([4, 8]), O=st.integers(1, 70), groups=st.integers(1, 5), group=st.sampled_from([32, 64, 128]),
       seed=st.integers(0, 2**16))
def test_dequantize_rows_is_bitwise_mx_dequantize(variant, bits, O, groups, group, seed):
    """The fp32 weight of the BLAS prefill path, with full-precision fp32 scales and biases (where an FMA's single
    rounding of s * q + b would differ from MLX's two: the kernel must not fuse them)."""
    import mlx.core as mx

    rng = np.random.default_rng(seed)
    K = groups * group
    wq, s, b = mx.quantize(mx.array(rng.standard_normal((O, K)).astype(np.float32)), group, bits)
    s = mx.array(np.asarray(s) * (1 + 1e-3 * rng.standard_normal(s.shape)).astype(np.float32))
    b = mx.array(np.asarray(b) + (1e-4 * rng.standard_normal(b.shape)).astype(np.float32))
    want = np.array(mx.dequantize(wq, s, b, group, bits))
    codes, sn, bn = (np.ascontiguousarray(np.asarray(a)) for a in (wq, s, b))
    out = np.full((O, K), np.nan, np.float32)
    assert variant.dequantize_rows(ptr(codes.view(np.uint8)), ptr(sn), ptr(bn), ptr(out), O, K, group, bits) == 0
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))


def test_dequantize_rows_refuses_layouts_it_does_not_take(variant):
    out = np.zeros(64, np.float32)
    for group, bits, K in ((32, 3, 64), (32, 4, 48), (0, 4, 64)):
        assert variant.dequantize_rows(0, 0, 0, ptr(out), 1, K, group, bits) == -1


@SETTINGS
@given(n=st.integers(1, 1000), spread=st.floats(0.01, 150.0), seed=st.integers(0, 2**16))
def test_silu_mul(variant, n, spread, seed):
    rng = np.random.default_rng(seed)
    g = (rng.standard_normal(n) * spread).astype(np.float32)
    u = rng.standard_normal(n).astype(np.float32)
    ref = g.astype(np.float64) / (1 + np.exp(-g.astype(np.float64))) * u
    variant.silu_mul(ptr(g), ptr(u), n)
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, ref, rtol=2e-5, atol=1e-6)


# ---------------------------------------------------------------- 4/8-bit gemv and rows


def packed(rng, O: int, K: int, bits: int):
    """Random weights in MLX's layout: codes (O, K), packed bytes, fp32 scales and biases per group of 32."""
    codes = rng.integers(0, 2**bits, (O, K), dtype=np.uint8)
    w = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8) if bits == 4 else codes.copy()
    s = (rng.standard_normal((O, K // 32)) * 0.05).astype(np.float32)
    b = (rng.standard_normal((O, K // 32)) * 0.1).astype(np.float32)
    return codes, np.ascontiguousarray(w), s, b


def test_prefill_attention_stays_shared_while_the_pool_backs_off(variant):
    """A stall makes the pool run the next light (decode) jobs alone; the prefill kernels' heavy jobs still share."""
    rng = np.random.default_rng(6)
    H, Hkv, L, T, D = 4, 2, 96, 96, 64
    q, k, v = (rng.standard_normal((n, L, D)).astype(np.float32) for n in (H, Hkv, Hkv))
    out = np.empty((L, H * D), np.float32)
    before = cpu_kernels.threads()
    try:
        cpu_kernels.set_threads(2)
        variant.parley_pool_back_off(1000)
        stats = cpu_kernels.pool_stats()
        variant.prefill_attention(ptr(q), ptr(k), ptr(v), ptr(out), H, Hkv, L, T, D, D, L * D, T * D, T * D, 0, 1)
        after = cpu_kernels.pool_stats()
    finally:
        cpu_kernels.set_threads(before)  # also ends the backoff
    assert after["shared"] == stats["shared"] + 1 and after["alone"] == stats["alone"]


@SETTINGS
@given(bits=st.sampled_from([4, 8]), O=st.integers(1, 70), groups=st.integers(1, 12), B=st.integers(1, 8),
       seed=st.integers(0, 2**16))
def test_quantized_gemv_and_rows(variant, bits, O, groups, B, seed):
    rng = np.random.default_rng(seed)
    K = 32 * groups
    codes, w, s, b = packed(rng, O, K, bits)
    x = rng.standard_normal((B, K)).astype(np.float32)
    dense = codes * np.repeat(s, 32, axis=1).astype(np.float64) + np.repeat(b, 32, axis=1)
    ref = x.astype(np.float64) @ dense.T
    bound = 1e-5 * (np.abs(x) @ np.abs(dense).T) + 1e-6
    gemv = variant.q4_gemv if bits == 4 else variant.q8_gemv
    rows = variant.q4_rows if bits == 4 else variant.q8_rows
    single = np.empty((B, O), np.float32)
    for r in range(B):
        gemv(ptr(w), ptr(s), ptr(b), ptr(x[r]), ptr(single[r]), O, K)
    batched = np.empty((B, O), np.float32)
    rows(ptr(w), ptr(s), ptr(b), ptr(x), ptr(batched), O, K, B)
    assert (np.abs(single - ref) <= bound).all(), np.abs(single - ref).max()
    assert np.array_equal(batched, single)  # a row computes the same bits alone or in a batch (scenes)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_gemv_reads_mlx_layout(variant, bits):
    """The layout the kernels assume is MLX's own: the result equals MLX's quantized matmul."""
    import mlx.core as mx
    import mlx.nn as nn

    from app.model.host_exec import Q4Weights

    mx.random.seed(bits)
    layer = nn.QuantizedLinear(160, 48, bias=False, group_size=32, bits=bits)
    x = mx.random.normal((1, 1, 160))
    ours, ref = np.array(Q4Weights.of(layer)(x)), np.array(layer(x))
    assert np.abs(ours - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_only_vector_variants_claim_fast_quantized_decode(variant):
    """q4_fast says whether decode should use the 4-bit gemv (the scalar body is slower than fp32 BLAS)."""
    assert variant.q4_fast() == (cpu_kernels.active_variant() != "portable")


# ---------------------------------------------------------------- KV block decoder


def lut() -> np.ndarray:
    return np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def unpack(q: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return q.astype(np.float32)
    codes = np.empty(q.shape[:-1] + (q.shape[-1] * 2,), np.float32)
    codes[..., 0::2], codes[..., 1::2] = q & 15, q >> 4
    return codes


@SETTINGS
@given(kind=st.sampled_from(["token", "channel", "f16", "f32"]), bits=st.sampled_from([4, 8]), H=st.integers(1, 3),
       T=st.integers(1, 70), D=st.sampled_from([6, 8, 16, 24, 64]), G=st.sampled_from([2, 4, 8, 16, 32, 64]),
       t0=st.integers(0, 20), threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_kv_decode_is_bitwise(variant, kind, bits, H, T, D, G, t0, threads, seed):
    """Blocks written at token t0 of a longer buffer (heads `cap` tokens apart), groups that do not divide T."""
    rng = np.random.default_rng(seed)
    table = lut()
    cap = t0 + T + 3
    out = np.full((H, cap, D), -1.0, np.float32)
    job = np.zeros(12, np.int64)
    job[2:5] = H, T, D
    job[9], job[10] = out.ctypes.data + 4 * t0 * D, cap * D
    f16 = lambda shape: (rng.standard_normal(shape) * 0.5).astype(np.float16)  # noqa: E731
    if kind in ("f16", "f32"):
        x = f16((H, T, D))
        x = x if kind == "f16" else x.astype(np.float32)
        job[0], job[6] = (2 if kind == "f16" else 3), ptr(x)
        ref = x.astype(np.float32)
        keep = [x]
    else:
        if kind == "token":
            G = min(G, D) if D % min(G, D) == 0 else 2
            groups = (H, T, D // G)
        else:
            groups = (H, -(-T // G), D)
        q = rng.integers(0, 256, (H, T, D * bits // 8), dtype=np.uint8)
        s, b = f16(groups), f16(groups)
        job[0], job[1], job[5] = (0 if kind == "token" else 1), bits, G
        job[6], job[7], job[8] = ptr(q), ptr(s.view(np.uint16)), ptr(b.view(np.uint16))
        sf, bf = s.astype(np.float32), b.astype(np.float32)
        if kind == "token":
            sf, bf = np.repeat(sf, G, axis=2), np.repeat(bf, G, axis=2)
        else:
            sf, bf = np.repeat(sf, G, axis=1)[:, :T], np.repeat(bf, G, axis=1)[:, :T]
        ref = unpack(q, bits) * sf + bf  # float32 multiply, then add: MLX's order
        keep = [q, s, b]
    jobs = np.stack([job, job]) if threads == 2 else job[None]  # two equal jobs: the helper thread runs one
    variant.kv_decode_jobs(ptr(table), jobs.shape[0], ptr(jobs), threads)
    assert np.array_equal(out[:, t0:t0 + T].view(np.uint32), ref.view(np.uint32))
    assert (out[:, :t0] == -1).all() and (out[:, t0 + T:] == -1).all()  # nothing written outside the block
    del keep


# ---------------------------------------------------------------- threads (app/csrc/threads.c)


@pytest.fixture
def pool():
    """Set the kernels' thread count and threading threshold for one test (both restored afterwards)."""
    if cpu_kernels.kernels() is None:
        pytest.skip("the C kernels are off or not built")
    before, min_work = cpu_kernels.threads(), cpu_kernels.set_min_work(0)

    def use(threads: int, work: int = 0) -> None:
        cpu_kernels.set_threads(threads)
        cpu_kernels.set_min_work(work)

    yield use
    cpu_kernels.set_threads(before)
    cpu_kernels.set_min_work(min_work)


def gemv_all(variant, bits, w, s, b, x, O, K):
    """(each row alone, all rows batched) of the quantized gemv."""
    B = x.shape[0]
    gemv = variant.q4_gemv if bits == 4 else variant.q8_gemv
    rows = variant.q4_rows if bits == 4 else variant.q8_rows
    single, batched = np.empty((B, O), np.float32), np.empty((B, O), np.float32)
    for r in range(B):
        gemv(ptr(w), ptr(s), ptr(b), ptr(x[r]), ptr(single[r]), O, K)
    rows(ptr(w), ptr(s), ptr(b), ptr(x), ptr(batched), O, K, B)
    return single, batched


@SETTINGS
@given(bits=st.sampled_from([4, 8]), O=st.one_of(st.integers(1, 80), st.integers(81, 3000)), groups=st.integers(1, 24),
       B=st.integers(1, 8), threads=st.integers(2, 4), seed=st.integers(0, 2**16))
def test_threaded_gemv_is_bitwise_one_thread(variant, pool, bits, O, groups, B, threads, seed):
    """Output rows split over threads (odd counts, fewer rows than chunks): every row the same bits."""
    rng = np.random.default_rng(seed)
    K = 32 * groups
    _, w, s, b = packed(rng, O, K, bits)
    x = rng.standard_normal((B, K)).astype(np.float32)
    pool(1)
    want = gemv_all(variant, bits, w, s, b, x, O, K)
    pool(threads)
    got = gemv_all(variant, bits, w, s, b, x, O, K)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


@pytest.mark.parametrize("bits", [4, 8])
def test_the_helper_thread_really_computes_gemv_rows(variant, pool, bits):
    """Repeated until the helper thread has run some of the rows (bounded), each time bitwise one thread:
    the threaded path itself is what is checked, not a caller that happened to do everything alone."""
    rng = np.random.default_rng(bits)
    O, K = 3072, 576
    _, w, s, b = packed(rng, O, K, bits)
    x = rng.standard_normal((1, K)).astype(np.float32)
    pool(1)
    want = gemv_all(variant, bits, w, s, b, x, O, K)[0]
    pool(2)
    before = cpu_kernels.pool_stats()["helper_chunks"]
    for _ in range(2000):
        assert np.array_equal(gemv_all(variant, bits, w, s, b, x, O, K)[0], want)
        if cpu_kernels.pool_stats()["helper_chunks"] > before:
            break
    assert cpu_kernels.pool_stats()["helper_chunks"] > before, "the helper thread never ran a chunk"


def test_small_jobs_stay_on_the_calling_thread(variant, pool):
    """Under the threshold nothing is handed to the pool (a hand-off costs more than a tiny gemv)."""
    rng = np.random.default_rng(0)
    _, w, s, b = packed(rng, 64, 64, 4)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    pool(2, work=1 << 16)
    before = cpu_kernels.pool_stats()
    gemv_all(variant, 4, w, s, b, x, 64, 64)
    after = cpu_kernels.pool_stats()
    assert after["shared"] == before["shared"] and after["alone"] == before["alone"]


def test_thread_count_comes_from_parley_threads_and_bad_values_are_refused():
    code = "from app.model import cpu_kernels as c; print(c.threads())"
    run = lambda value: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,  # noqa: E731
                                       env={**os.environ, "PARLEY_THREADS": value}, timeout=120)
    if cpu_kernels.kernels() is None:
        pytest.skip("the C kernels are off or not built")
    assert run("3").stdout.strip() == "3" and run("1").stdout.strip() == "1"
    default = run("").stdout.strip()
    assert default == str(min(len(os.sched_getaffinity(0)), 2))
    bad = run("lots")
    assert bad.returncode != 0 and "PARLEY_THREADS='lots' is not a thread count: use 1 to 16" in bad.stderr


# ---------------------------------------------------------------- choosing a variant


@pytest.fixture
def fresh_choice(monkeypatch):
    """PARLEY_KERNELS read afresh by kernels(); the best variant back afterwards."""
    monkeypatch.delenv("PARLEY_CPU_KERNELS", raising=False)
    cpu_kernels.reset()
    yield monkeypatch
    cpu_kernels.reset()  # the next kernels() loads afresh, after monkeypatch has undone the test's changes


def test_forcing_a_variant_this_cpu_cannot_run_is_refused(fresh_choice):
    if cpu_kernels.kernels() is None:
        pytest.skip("the C kernels are off or not built")
    missing = [name for name, v in cpu_kernels.variants().items() if not v["usable"]]
    if not missing:
        pytest.skip("this CPU runs every variant the library holds")
    fresh_choice.setenv("PARLEY_KERNELS", missing[-1])
    cpu_kernels.reset()
    with pytest.raises(cpu_kernels.KernelChoiceError, match=f"the {missing[-1]} kernels .*PARLEY_KERNELS"):
        cpu_kernels.kernels()


def test_unknown_variant_names_are_refused_and_off_switches_off(fresh_choice):
    fresh_choice.setenv("PARLEY_KERNELS", "sse9")
    with pytest.raises(cpu_kernels.KernelChoiceError, match="'sse9' is not a kernel variant"):
        cpu_kernels.kernels()
    fresh_choice.setenv("PARLEY_KERNELS", "off")
    cpu_kernels.reset()
    assert cpu_kernels.kernels() is None


def test_forcing_a_variant_the_cpu_runs_uses_it(fresh_choice):
    if cpu_kernels.kernels() is None:
        pytest.skip("the C kernels are off or not built")
    best = cpu_kernels.active_variant()
    fresh_choice.setenv("PARLEY_KERNELS", "portable")
    cpu_kernels.reset()
    assert cpu_kernels.active_variant() == "portable" and cpu_kernels.kernels().q4_fast() == 0
    fresh_choice.delenv("PARLEY_KERNELS")
    cpu_kernels.reset()
    assert cpu_kernels.active_variant() == best  # unset again: the best one, not the last forced


# ---------------------------------------------------------------- loading


def test_library_missing_means_plain_mlx_said_once(fresh_choice, caplog, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "library_path", lambda: None)
    monkeypatch.setattr(cpu_kernels, "_warned", False)
    with caplog.at_level("WARNING", logger=cpu_kernels.__name__):
        assert cpu_kernels.kernels() is None
        cpu_kernels.reset()
        assert cpu_kernels.kernels() is None
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "not built" in notes[0] and "gcc" in notes[0]


def test_a_world_writable_library_is_not_loaded(fresh_choice, caplog, monkeypatch, tmp_path):
    if cpu_kernels.library_path() is None:
        pytest.skip("the C kernels are not built")
    folder = tmp_path / "planted"
    folder.mkdir()
    lib = folder / "_kernels.so"
    lib.write_bytes(cpu_kernels.library_path().read_bytes())
    folder.chmod(0o777)
    monkeypatch.setattr(cpu_kernels, "library_path", lambda: lib)
    monkeypatch.setattr(cpu_kernels, "_warned", False)
    with caplog.at_level("WARNING", logger=cpu_kernels.__name__):
        assert cpu_kernels.kernels() is None
    assert str(folder) in caplog.text and "writable by every user" in caplog.text


def test_data_pointer_refuses_wrong_buffers_even_under_python_O():
    """A C kernel writing through a strided or non-float32 view would corrupt memory: a real check, not assert."""
    code = ("from app import fastblas; fastblas.preload()\n"
            "import mlx.core as mx\n"
            "from app.model.cpu_kernels import data_pointer\n"
            "a = mx.zeros((4, 6)); mx.eval(a); data_pointer(a)\n"
            "for bad in (mx.zeros((4, 6)).T, mx.zeros(5, dtype=mx.int32)):\n"
            "    mx.eval(bad)\n"
            "    try:\n"
            "        data_pointer(bad)\n"
            "    except ValueError:\n"
            "        print('refused')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.stdout.split() == ["refused", "refused"], out.stderr
