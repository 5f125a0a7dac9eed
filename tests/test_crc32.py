"""The cache files' CRC-32 by carry-less multiplication (app/csrc/crc32.c): zlib's value for every length,
alignment and starting CRC, in every kernel variant this CPU runs (the portable one: its table loop), and
`blockfile.crc32` (which restores call over every stored byte) equal to zlib whichever path it takes; a single
flipped bit anywhere in a block-sized buffer changes it."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.kvstore import blockfile
from app.model import cpu_kernels

needs_c = pytest.mark.skipif(cpu_kernels.kernels() is None, reason="no C compiler / PARLEY_CPU_KERNELS=0")


def usable() -> list[str]:
    return [name for name, v in cpu_kernels.variants().items() if v["usable"]]


@needs_c
@settings(max_examples=80, deadline=None)
@given(n=st.one_of(st.integers(0, 300), st.integers(300, 70000)), offset=st.integers(0, 15),
       crc=st.sampled_from([0, 1, 0xFFFFFFFF, 0x12345678]), seed=st.integers(0, 2**16))
def test_every_variant_is_zlibs_crc32(n, offset, crc, seed):
    data = np.random.default_rng(seed).integers(0, 256, n + offset, dtype=np.uint8)[offset:]  # unaligned starts too
    lib, before = cpu_kernels.kernels(), cpu_kernels.active_variant()
    want = zlib.crc32(data, crc)
    try:
        for name in usable():
            cpu_kernels.use_variant(name)
            assert lib.crc32_update(crc, data.ctypes.data, n) == want, name
            assert blockfile.crc32(data, crc) == want, name
    finally:
        cpu_kernels.use_variant(before)


@needs_c
def test_the_fast_path_is_there_where_the_cpu_has_it():
    """The AVX2 and AVX-512 variants fold on a CPU with PCLMULQDQ (every x86-64 that runs them in practice)."""
    lib, before = cpu_kernels.kernels(), cpu_kernels.active_variant()
    try:
        cpu_kernels.use_variant("portable")
        assert not lib.crc32_fast()
        for name in (v for v in usable() if v != "portable"):
            cpu_kernels.use_variant(name)
            assert lib.crc32_fast() or "pclmul" not in open("/proc/cpuinfo").read(), name
    finally:
        cpu_kernels.use_variant(before)


def test_one_flipped_bit_changes_the_crc():
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, 200_000, dtype=np.uint8)
    want = blockfile.crc32(data)
    assert want == zlib.crc32(data)
    for pos in (0, 63, 64, 4095, 100_000, 199_999):
        bad = data.copy()
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        assert blockfile.crc32(bad) != want
