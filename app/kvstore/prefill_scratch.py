"""One layer's keys and values for a prefill chunk over a compact cache, decoded into a shared scratch buffer.

A prefill chunk attends over every position. Compact caches keep their sealed
blocks only encoded (app.kvstore.live_cache), so each chunk used to decode every
sealed block of every layer into fresh fp32 arrays (allocated, zero-filled,
written by two threads started per block), then concatenate them with the tail:
three passes over the whole context per layer and chunk, plus a thread start-up
per block. That was most of a resume's time to first token (the question's
prefill over the restored 4K context).

Here the C block decoder (`kv_decode_jobs`, bit-identical to what sealing writes
back) writes a layer's blocks into one scratch buffer per thread, reused by every
layer and chunk (it stays in the CPU caches), and the tail is copied after them:
one C call per layer, the job table made from the cache's `BlockTable` (kept in
step with the blocks, so nothing is re-read). The values are the ones the old
path concatenated, so the attention computes exactly what it did.

Contract: the arrays returned are views of the scratch, which the next call
overwrites; the caller evaluates everything that reads them before it returns
(`CpuAttention` evaluates its output). `release()` frees the scratch after a
prefill burst, so an active conversation holds its encoded bytes plus the tail.

The scratch is an fp32 copy of a layer's sealed blocks: freed, it goes back to
the allocator, not into MLX's cache of freed buffers (which `Session.open` lets
grow to the cache budget, and which reuses a buffer only for a request of about
its size, so an old scratch would sit there as a dead fp32 copy of the context).
`reserve(tokens)` sizes the next scratch for a whole prefill at once, so a long
prefill makes one scratch instead of one per `GROW_TOKENS` it grows by.
"""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np

from app.kvstore import fast_decode
from app.model import cpu_kernels

GROW_TOKENS = 1024  # the scratch grows in steps of this many positions


class _Scratch:
    """Flat fp32 buffers (evaluated MLX arrays) for keys and values, and their addresses.

    A call lays its (1, H, n, D) arrays out contiguously at the start (heads n * D floats apart), so
    what it hands back is shaped exactly like the concatenation it replaces (no strided batch that a
    matmul would copy first)."""

    def __init__(self, heads: int, dk: int, dv: int, cap: int):
        self.shape, self.cap = (heads, dk, dv), cap
        self.keys = mx.zeros((heads * cap * dk,), mx.float32)
        self.values = mx.zeros((heads * cap * dv,), mx.float32)
        mx.eval(self.keys, self.values)
        self.kp = np.asarray(memoryview(self.keys)).ctypes.data
        self.vp = np.asarray(memoryview(self.values)).ctypes.data

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def views(self, n: int) -> tuple[mx.array, mx.array]:
        """The first (1, H, n, D) keys and values (contiguous)."""
        h, dk, dv = self.shape
        return self.keys[:h * n * dk].reshape(1, h, n, dk), self.values[:h * n * dv].reshape(1, h, n, dv)


_local = threading.local()


def _scratch(heads: int, dk: int, dv: int, n: int) -> _Scratch:
    """This thread's scratch, (re)made when too small or of another shape (at least the `reserve`d size)."""
    s = getattr(_local, "scratch", None)
    if s is not None and s.shape == (heads, dk, dv) and s.cap >= n:
        return s
    del s
    _drop()  # the old buffers go before the new ones are made
    cap = max(n, getattr(_local, "reserved", 0))
    s = _local.scratch = _Scratch(heads, dk, dv, -(-cap // GROW_TOKENS) * GROW_TOKENS)
    return s


def reserve(tokens: int) -> None:
    """The coming prefill attends over up to `tokens` positions: a scratch made for it is made that large."""
    _local.reserved = max(0, int(tokens))


def release() -> None:
    """Free this thread's scratch (after a prefill burst), past MLX's cache of freed buffers; forget `reserve`."""
    _local.reserved = 0
    _drop()


def _drop() -> None:
    """Let this thread's scratch go straight back to the allocator: MLX's cache limit is held at what the cache
    holds now while the last references go, so the buffers are freed instead of cached (nothing is evicted)."""
    if getattr(_local, "scratch", None) is None:
        return
    previous = mx.set_cache_limit(mx.get_cache_memory())
    try:
        _local.scratch = None
    finally:
        mx.set_cache_limit(previous)


def held_bytes() -> int:
    """Bytes of this thread's scratch (0 when released)."""
    s = getattr(_local, "scratch", None)
    return 0 if s is None else s.nbytes


def block_jobs(table, kp: int, vp: int, cap: int) -> np.ndarray:
    """`kv_decode_jobs` rows (12 longs) decoding every block of `table` into (H, cap, D) buffers at kp/vp
    (heads `cap` positions apart)."""
    rows = table.rows
    n = rows.shape[0]
    t = rows[:, 6]
    t0 = np.concatenate([[0], np.cumsum(t)[:-1]]).astype(np.int64)
    kspec, vspec = table.specs()
    jobs = np.zeros((2 * n, 12), np.int64)
    for i, (spec, d, ptr, cols) in enumerate(((kspec, table.dk, kp, slice(0, 3)), (vspec, table.dv, vp, slice(3, 6)))):
        j = jobs[i * n:(i + 1) * n]
        j[:, 0], j[:, 1], j[:, 5] = spec[0], spec[1], spec[2]
        j[:, 2], j[:, 3], j[:, 4] = table.h, t, d
        j[:, 6:9] = rows[:, cols]
        j[:, 9] = ptr + 4 * t0 * d
        j[:, 10] = cap * d
    return jobs


def tail_jobs(keys: mx.array, values: mx.array, n_tail: int, start: int, kp: int, vp: int, cap: int) -> np.ndarray:
    """Jobs copying the fp32 tail rows [0, n_tail) of (1, H, *, D) working copies to position `start`, head by head
    (the working copies' heads are their capacity apart, the scratch's `cap` apart)."""
    out = []
    for src, ptr in ((keys, kp), (values, vp)):
        view = np.asarray(memoryview(src))
        if view.dtype != np.float32 or not view.flags.c_contiguous:
            raise fast_decode.Unsupported("tail layout")
        heads, src_cap, d = view.shape[1], view.shape[2], view.shape[3]
        j = np.zeros((heads, 12), np.int64)
        j[:, 0], j[:, 2], j[:, 3], j[:, 4] = 3, 1, n_tail, d
        j[:, 6] = view.ctypes.data + 4 * src_cap * d * np.arange(heads, dtype=np.int64)
        j[:, 9] = ptr + 4 * (start * d + cap * d * np.arange(heads, dtype=np.int64))
        out.append(j)
    return np.concatenate(out)


def keys_and_values(table, keys: mx.array | None, values: mx.array | None, n_tail: int
                    ) -> tuple[mx.array, mx.array] | None:
    """Every position's keys and values, contiguous (1, H, blocks + n_tail, D) views of this thread's scratch: `table`'s
    blocks decoded, then the first `n_tail` rows of the working copies `keys`/`values` (evaluated fp32).
    None when the C decoder is not there or the input is not for it (the caller decodes the old way)."""
    lib = fast_decode.kernels()
    if lib is None:
        return None
    n_sealed = table.tokens
    total = n_sealed + n_tail
    if total < 1:
        return None
    try:
        s = _scratch(table.h, table.dk, table.dv, total)
        parts = [block_jobs(table, s.kp, s.vp, total)] if n_sealed else []
        if n_tail:
            parts.append(tail_jobs(keys, values, n_tail, n_sealed, s.kp, s.vp, total))
    except fast_decode.Unsupported:
        return None
    jobs = np.ascontiguousarray(np.concatenate(parts))
    lib.kv_decode_jobs(cpu_kernels.float16_table().ctypes.data, jobs.shape[0], jobs.ctypes.data, 1)
    return s.views(total)
