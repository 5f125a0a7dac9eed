"""Decode sealed KV blocks straight into the working copy, in C (bit-identical to `schemes.decode`).

`SealingKVCache.restore` used to decode every block with MLX ops (unpack, stack, astype, multiply,
add), concatenate the blocks and pad the result: ~10 passes over the fp32 working copy. Here one
C kernel per tensor kind writes each decoded element once, into per-layer buffers allocated at
their final size (headroom included, zero as before).

Exactness: `TensorQuant.decode` computes `codes.astype(f32) * scale.astype(f32) + bias.astype(f32)`
with separate MLX multiply and add. A code is an integer < 256 (8 bits) and a float16 scale has an
11-bit significand, so the product is exact in fp32; the one rounding is the add. Whether the C
compiler fuses the two into an FMA therefore changes nothing: the result is the same fp32 value.
float16 -> float32 goes through a 65,536-entry table made by MLX's own conversion, so even NaN
payloads match. The tests compare every element bit for bit with `scheme.decode`.

The kernel is app/csrc/kv_decode.c.

Speed (8K-token q4 cache, ~380 MB of fp32 written; 2-core AMD EPYC VM): the scalar loops took
~38 ms, compute-bound; with AVX2 (8 codes unpacked by one variable shift, separate multiply and
add) ~30 ms, which is what a memset of the same bytes costs, and split over two threads ~20 ms.
Non-temporal stores were tried and were slower here.

Only the plain schemes are handled (4/8-bit affine per token or per channel, float16; no rotation,
centering or outliers) and only fp32 working copies; anything else, a shape or dtype that does not
fit, no C kernels (not built, or `PARLEY_KERNELS=off`) makes `decode_layers` return None and the caller
decodes with MLX as before.
"""

from __future__ import annotations

import ctypes
import os
import threading

import mlx.core as mx
import numpy as np

from app.kvstore.blockfile import HostTensor
from app.model import cpu_kernels

# Two threads decode each block (memory-write bound: a second core adds bandwidth); one on a 1-core box.
DECODE_THREADS = 2 if (os.cpu_count() or 1) > 1 else 1
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet
_lut: np.ndarray | None = None


def kernels() -> ctypes.CDLL | None:
    """The C kernels with `kv_decode_jobs` (app/csrc/kv_decode.c), or None; loads the float16 table once."""
    global _lib, _lut
    if _lib is False:
        _lib = cpu_kernels.kernels()
        _lut = cpu_kernels.float16_table() if _lib is not None else None
    return _lib


class Unsupported(Exception):
    """This input is not for the C path; the caller decodes with MLX."""


def _buf(a) -> np.ndarray:
    view = a.data if isinstance(a, HostTensor) else np.asarray(memoryview(a))
    if not view.flags.c_contiguous:
        raise Unsupported("non-contiguous array")
    return view


def _stacked_shape(x) -> tuple | None:
    """Shape of an array stacked over layers (MLX or host), or None for a per-layer list."""
    if isinstance(x, HostTensor):
        return tuple(x.data.shape)
    if isinstance(x, mx.array):
        return tuple(x.shape)
    return None


class _Source:
    """One encoded array for every layer: stacked (L, ...) in MLX or host memory, or one array per layer."""

    __slots__ = ("ptrs", "shape", "dtype", "keep")

    def __init__(self, arrays, n_layers: int):
        whole = _stacked_shape(arrays)
        if whole is not None:  # stacked over layers on axis 0
            if len(whole) < 1 or whole[0] != n_layers:
                raise Unsupported("layer count")
            view = _buf(arrays)
            step = view.nbytes // n_layers
            self.ptrs = view.ctypes.data + step * np.arange(n_layers, dtype=np.int64)
            self.shape, self.dtype, self.keep = whole[1:], arrays.dtype, view
        else:
            arrays = list(arrays)
            if len(arrays) != n_layers:
                raise Unsupported("layer count")
            shape, dtype = tuple(arrays[0].shape), arrays[0].dtype
            views = []
            for a in arrays:
                if tuple(a.shape) != shape or a.dtype != dtype:
                    raise Unsupported("layers differ")
                views.append(_buf(a))
            self.ptrs = np.array([v.ctypes.data for v in views], dtype=np.int64)
            self.shape, self.dtype, self.keep = shape, dtype, views


def _tensor_jobs(quant, block, prefix: str, n_layers: int, h: int, d: int, out_ptrs: np.ndarray,
                 t0: int, os: int, keep: list) -> tuple[np.ndarray, int]:
    """Jobs decoding one tensor of one block for every layer; returns (jobs, tokens)."""
    if quant.rotate or quant.center or quant.outliers:
        raise Unsupported("scheme option")
    jobs = np.zeros((n_layers, 12), dtype=np.int64)
    if quant.bits == 16:
        x = _Source(block[prefix], n_layers)
        if x.dtype != mx.float16 or len(x.shape) != 3 or x.shape[0] != h or x.shape[2] != d:
            raise Unsupported("f16 shape")
        t = x.shape[1]
        jobs[:, 0], jobs[:, 6] = 2, x.ptrs
        keep.append(x)
    else:
        if quant.bits not in (4, 8):
            raise Unsupported("bits")
        q = _Source(block[f"{prefix}_q"], n_layers)
        s = _Source(block[f"{prefix}_scale"], n_layers)
        b = _Source(block[f"{prefix}_bias"], n_layers)
        keep += [q, s, b]
        if q.dtype != mx.uint8 or s.dtype != mx.float16 or b.dtype != mx.float16 or s.shape != b.shape:
            raise Unsupported("dtypes")
        if len(q.shape) != 3 or len(s.shape) != 3 or q.shape[0] != h or s.shape[0] != h:
            raise Unsupported("ranks")
        t = q.shape[1]
        if t < 1 or d * quant.bits % 8 or q.shape[2] != d * quant.bits // 8:
            raise Unsupported("packed width")
        if quant.axis == "token":
            ng = s.shape[2]
            if s.shape[1] != t or ng < 1 or d % ng:
                raise Unsupported("token groups")
            g = d // ng
            if quant.bits == 4 and g % 2:
                raise Unsupported("odd group")
            kind = 0
        else:
            g = min(quant.group, t)
            if s.shape[1] != -(-t // g) or s.shape[2] != d or d % 2:
                raise Unsupported("channel groups")
            kind = 1
        jobs[:, 0], jobs[:, 1], jobs[:, 5] = kind, quant.bits, g
        jobs[:, 6], jobs[:, 7], jobs[:, 8] = q.ptrs, s.ptrs, b.ptrs
    jobs[:, 2], jobs[:, 3], jobs[:, 4] = h, t, d
    jobs[:, 9] = out_ptrs + 4 * t0 * d
    jobs[:, 10] = os
    return jobs, t


def _dims(block, n_layers: int) -> tuple[int, int]:
    dims = block["dims"]
    if _stacked_shape(dims) is not None:
        flat = _buf(dims).reshape(-1, 2)
    else:
        flat = np.stack([np.asarray(memoryview(x)).reshape(2) for x in dims])
    if flat.shape[0] != n_layers or (flat != flat[0]).any():
        raise Unsupported("dims")
    return int(flat[0, 0]), int(flat[0, 1])


def layer_shape(x) -> tuple:
    """One layer's shape of an array stacked over layers or of a per-layer list."""
    whole = _stacked_shape(x)
    return whole[1:] if whole is not None else tuple(x[0].shape)


def _block_length(scheme, block) -> int:
    a = block["k_q" if scheme.keys.bits != 16 else "k"]
    whole = _stacked_shape(a)
    return whole[2] if whole is not None else a[0].shape[1]


def _heads(scheme, block) -> int:
    a = block["k_q" if scheme.keys.bits != 16 else "k"]
    whole = _stacked_shape(a)
    return whole[1] if whole is not None else a[0].shape[0]


_local = threading.local()


def _fill_streams() -> list:
    """Two CPU streams (MLX runs each on its own thread) to zero-fill the working copies on both cores.

    MLX cannot allocate without filling; ~380 MB of fills took 23 ms on one stream, 16 ms on two.
    MLX streams belong to the thread that made them, so each engine thread gets its own second
    stream (None: the thread's default stream).
    """
    if getattr(_local, "streams", None) is None:
        _local.streams = [None, mx.new_stream(mx.cpu)]
    return _local.streams


class WorkingCopies:
    """Per-layer fp32 working copies of a known size, filled block by block (then the tail) in C.

    Filling one block at a time lets a restore decode each block as soon as its
    file is read and verified, while the kernel is still reading the next ones.
    """

    def __init__(self, lib, scheme, n_layers: int, heads: int, dk: int, dv: int, n_tokens: int, step: int):
        self.lib, self.scheme, self.n_layers = lib, scheme, n_layers
        self.h, self.dk, self.dv, self.n = heads, dk, dv, n_tokens
        self.cap = n_tokens + (-n_tokens) % step
        streams = _fill_streams()
        self.keys = [mx.zeros((1, heads, self.cap, dk), mx.float32, stream=streams[i % 2]) for i in range(n_layers)]
        self.values = [mx.zeros((1, heads, self.cap, dv), mx.float32, stream=streams[(i + 1) % 2]) for i in range(n_layers)]
        mx.eval(self.keys, self.values)
        self.kp = np.array([_buf(x).ctypes.data for x in self.keys], dtype=np.int64)
        self.vp = np.array([_buf(x).ctypes.data for x in self.values], dtype=np.int64)
        self.t0 = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        """(KV heads, key dim, value dim) of every layer."""
        return self.h, self.dk, self.dv

    def add_block(self, block, threads: int | None = None) -> None:
        """Decode one sealed block (name -> stacked array, or name -> per-layer list) at the next position."""
        if _dims(block, self.n_layers) != (self.dk, self.dv):
            raise Unsupported("dims differ")
        length = _block_length(self.scheme, block)
        if self.t0 + length > self.n:
            raise Unsupported("more tokens than announced")
        keep: list = []
        jk, tk = _tensor_jobs(self.scheme.keys, block, "k", self.n_layers, self.h, self.dk, self.kp, self.t0,
                              self.cap * self.dk, keep)
        jv, tv = _tensor_jobs(self.scheme.values, block, "v", self.n_layers, self.h, self.dv, self.vp, self.t0,
                              self.cap * self.dv, keep)
        if tk != length or tv != length:
            raise Unsupported("block lengths")
        self._run(np.concatenate([jk, jv]), threads)
        self.t0 += length

    def add_tail(self, tail_k, tail_v) -> None:
        """The full-precision tail (stacked (L, H, T, D) or per-layer lists, float16 or float32)."""
        tails = (_Source(tail_k, self.n_layers), _Source(tail_v, self.n_layers))
        for src, d in zip(tails, (self.dk, self.dv)):
            if len(src.shape) != 3 or src.shape[0] != self.h or src.shape[2] != d or src.dtype not in (mx.float16, mx.float32):
                raise Unsupported("tail shape")
        n_tail = tails[0].shape[1]
        if tails[1].shape[1] != n_tail or self.t0 + n_tail != self.n:
            raise Unsupported("tail lengths")
        jobs = []
        for src, d, ptrs in ((tails[0], self.dk, self.kp), (tails[1], self.dv, self.vp)):
            j = np.zeros((self.n_layers, 12), dtype=np.int64)
            j[:, 0] = 2 if src.dtype == mx.float16 else 3
            j[:, 2], j[:, 3], j[:, 4] = self.h, n_tail, d
            j[:, 6] = src.ptrs
            j[:, 9] = ptrs + 4 * self.t0 * d
            j[:, 10] = self.cap * d
            jobs.append(j)
        self._run(np.concatenate(jobs))
        self.t0 += n_tail
        del tails

    def _run(self, jobs: np.ndarray, threads: int | None = None) -> None:
        """Decode a table of jobs in C, on `threads` threads (default `DECODE_THREADS`)."""
        table = np.ascontiguousarray(jobs)
        threads = threads or DECODE_THREADS
        self.lib.kv_decode_jobs(_lut.ctypes.data, table.shape[0], table.ctypes.data, threads)

    def result(self) -> list[tuple[mx.array, mx.array, int]]:
        if self.t0 != self.n:
            raise Unsupported("fewer tokens than announced")
        return [(k, v, self.n) for k, v in zip(self.keys, self.values)]


def start_working_copies(scheme, n_layers: int, first_block, n_tokens: int, dtype, step: int,
                         tail: tuple | None = None, shape: tuple[int, int, int] | None = None) -> WorkingCopies | None:
    """Working copies sized for `n_tokens`, shaped as `shape` (KV heads, key dim, value dim) when the
    caller knows it, else after `first_block` (or, with no blocks, after the `tail` keys and values);
    None if the C path does not apply. Blocks of another shape are refused later (`Unsupported`)."""
    lib = kernels()
    if lib is None or dtype != mx.float32 or n_layers < 1 or n_tokens < 1:
        return None
    try:
        if shape is not None:
            heads, dk, dv = shape
        elif first_block is not None:
            (dk, dv), heads = _dims(first_block, n_layers), _heads(scheme, first_block)
        else:
            (heads, _, dk), dv = layer_shape(tail[0]), layer_shape(tail[1])[2]
        return WorkingCopies(lib, scheme, n_layers, heads, dk, dv, n_tokens, step)
    except Unsupported:
        return None


def decode_layers(scheme, n_layers: int, blocks: list, tail_k, tail_v, dtype, step: int):
    """The working copies of `n_layers` layers: [(keys, values, offset)], each (1, H, N + headroom, D) fp32.

    `blocks`: per sealed block, a dict name -> array stacked over layers (as in a block file, MLX or
    host memory) or a dict name -> list of per-layer arrays. `tail_k`/`tail_v`: (L, H, T, D) arrays or
    per-layer lists (float16 or float32), or None. Returns None if this input is not for the C path
    (the caller decodes with MLX).
    """
    if not blocks and tail_k is None:
        return None
    try:
        n_tail = layer_shape(tail_k)[1] if tail_k is not None else 0
        n = sum(_block_length(scheme, b) for b in blocks) + n_tail
        copies = start_working_copies(scheme, n_layers, blocks[0] if blocks else None, n, dtype, step,
                                      tail=(tail_k, tail_v))
        if copies is None:
            return None
        for block in blocks:
            copies.add_block(block)
        if n_tail:
            copies.add_tail(tail_k, tail_v)
        return copies.result()
    except Unsupported:
        return None
