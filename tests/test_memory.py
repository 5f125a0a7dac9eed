"""reuse_freed_memory: the allocator settings that spare a restore its page faults."""

import platform

import mlx.core as mx
import pytest

from app.kvstore import memory


def test_mlx_keeps_at_least_the_budget_and_a_larger_limit_is_not_lowered():
    before = mx.set_cache_limit(1 << 20)
    try:
        memory.reuse_freed_memory(64 << 20)
        assert mx.set_cache_limit(8 << 30) == 64 << 20  # raised to the budget
        memory.reuse_freed_memory(64 << 20)
        assert mx.set_cache_limit(before) == 8 << 30  # left alone: it was larger
    finally:
        mx.set_cache_limit(before)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_accepts_the_thresholds():
    assert memory._glibc_keep_freed(512 << 20) is True
