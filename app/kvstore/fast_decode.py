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

Only the plain schemes are handled (4/8-bit affine per token or per channel, float16; no rotation,
centering or outliers) and only fp32 working copies; anything else, a shape or dtype that does not
fit, no C compiler or `PARLEY_CPU_KERNELS=0` makes `decode_layers` return None and the caller
decodes with MLX as before.
"""

from __future__ import annotations

import ctypes

import mlx.core as mx
import numpy as np

from app.model import ckernels

_C_SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* One job = 12 longs: kind, bits, H, T, D, G, q, s, b, out, out_head_stride, 0.
   kind 0: affine, groups of G channels per token: q (H,T,D*bits/8), s/b (H,T,D/G) float16 bits.
   kind 1: affine, groups of G tokens per channel: q (H,T,D*bits/8), s/b (H,ceil(T/G),D) float16 bits.
   kind 2: float16 (H,T,D) -> float32.  kind 3: float32 (H,T,D) copied.
   out: first token of this block in a (H, *, D) fp32 buffer whose heads are out_head_stride floats apart.
   4-bit codes: two a byte, the even channel in the low nibble. x = code * scale + bias in fp32. */

static void dec_token(const float *lut, long bits, long H, long T, long D, long G,
                      const uint8_t *q, const uint16_t *s, const uint16_t *b, float *out, long os) {
    long ng = D / G, dp = D * bits / 8;
    for (long h = 0; h < H; h++) {
        for (long t = 0; t < T; t++) {
            const uint8_t *qr = q + (h * T + t) * dp;
            const uint16_t *sr = s + (h * T + t) * ng, *br = b + (h * T + t) * ng;
            float *o = out + h * os + t * D;
            for (long g = 0; g < ng; g++) {
                float sc = lut[sr[g]], bi = lut[br[g]];
                float *og = o + g * G;
                if (bits == 4) {
                    const uint8_t *qg = qr + g * G / 2;
                    for (long j = 0; j < G / 2; j++) {
                        uint8_t c = qg[j];
                        og[2 * j] = (float)(c & 15) * sc + bi;
                        og[2 * j + 1] = (float)(c >> 4) * sc + bi;
                    }
                } else {
                    const uint8_t *qg = qr + g * G;
                    for (long j = 0; j < G; j++) og[j] = (float)qg[j] * sc + bi;
                }
            }
        }
    }
}

static void dec_channel(const float *lut, long bits, long H, long T, long D, long G,
                        const uint8_t *q, const uint16_t *s, const uint16_t *b, float *out, long os) {
    long n = (T + G - 1) / G, dp = D * bits / 8;
    float sf[D], bf[D];
    for (long h = 0; h < H; h++) {
        for (long g = 0; g < n; g++) {
            const uint16_t *sr = s + (h * n + g) * D, *br = b + (h * n + g) * D;
            for (long i = 0; i < D; i++) { sf[i] = lut[sr[i]]; bf[i] = lut[br[i]]; }
            long t1 = (g + 1) * G < T ? (g + 1) * G : T;
            for (long t = g * G; t < t1; t++) {
                const uint8_t *qr = q + (h * T + t) * dp;
                float *o = out + h * os + t * D;
                if (bits == 4) {
                    for (long j = 0; j < D / 2; j++) {
                        uint8_t c = qr[j];
                        o[2 * j] = (float)(c & 15) * sf[2 * j] + bf[2 * j];
                        o[2 * j + 1] = (float)(c >> 4) * sf[2 * j + 1] + bf[2 * j + 1];
                    }
                } else {
                    for (long j = 0; j < D; j++) o[j] = (float)qr[j] * sf[j] + bf[j];
                }
            }
        }
    }
}

void kv_decode_jobs(const float *lut, long n, const long *jobs) {
    for (long k = 0; k < n; k++) {
        const long *j = jobs + 12 * k;
        long kind = j[0], bits = j[1], H = j[2], T = j[3], D = j[4], G = j[5], os = j[10];
        const uint8_t *q = (const uint8_t *)j[6];
        const uint16_t *s = (const uint16_t *)j[7], *b = (const uint16_t *)j[8];
        float *out = (float *)j[9];
        if (kind == 0) dec_token(lut, bits, H, T, D, G, q, s, b, out, os);
        else if (kind == 1) dec_channel(lut, bits, H, T, D, G, q, s, b, out, os);
        else if (kind == 2) {
            const uint16_t *x = (const uint16_t *)q;
            for (long h = 0; h < H; h++)
                for (long i = 0; i < T * D; i++) out[h * os + i] = lut[x[h * T * D + i]];
        } else {
            const float *x = (const float *)q;
            for (long h = 0; h < H; h++) memcpy(out + h * os, x + h * T * D, sizeof(float) * T * D);
        }
    }
}
"""

_lib: ctypes.CDLL | None | bool = False  # False: not tried yet
_lut: np.ndarray | None = None


def kernels() -> ctypes.CDLL | None:
    global _lib, _lut
    if _lib is False:
        _lib = None
        lib = ckernels.build("kv_decode", _C_SOURCE)
        if lib is not None:
            lib.kv_decode_jobs.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p]
            lib.kv_decode_jobs.restype = None
            # float16 -> float32 exactly as MLX converts (the table is what MLX computes)
            table = mx.arange(65536, dtype=mx.uint32).astype(mx.uint16).view(mx.float16).astype(mx.float32)
            _lut = np.array(table, copy=True)
            _lib = lib
    return _lib


class _Unsupported(Exception):
    """This input is not for the C path; the caller decodes with MLX."""


def _buf(a: mx.array) -> np.ndarray:
    view = np.asarray(memoryview(a))
    if not view.flags.c_contiguous:
        raise _Unsupported("non-contiguous array")
    return view


class _Source:
    """One encoded array for every layer: either stacked (L, ...) or one array per layer."""

    __slots__ = ("ptrs", "shape", "dtype", "keep")

    def __init__(self, arrays, n_layers: int):
        if isinstance(arrays, mx.array):  # stacked over layers on axis 0
            if arrays.ndim < 1 or arrays.shape[0] != n_layers:
                raise _Unsupported("layer count")
            view = _buf(arrays)
            step = view.nbytes // n_layers
            self.ptrs = view.ctypes.data + step * np.arange(n_layers, dtype=np.int64)
            self.shape, self.dtype, self.keep = tuple(arrays.shape[1:]), arrays.dtype, view
        else:
            arrays = list(arrays)
            if len(arrays) != n_layers:
                raise _Unsupported("layer count")
            shape, dtype = tuple(arrays[0].shape), arrays[0].dtype
            views = []
            for a in arrays:
                if tuple(a.shape) != shape or a.dtype != dtype:
                    raise _Unsupported("layers differ")
                views.append(_buf(a))
            self.ptrs = np.array([v.ctypes.data for v in views], dtype=np.int64)
            self.shape, self.dtype, self.keep = shape, dtype, views


def _tensor_jobs(quant, block, prefix: str, n_layers: int, h: int, d: int, out_ptrs: np.ndarray,
                 t0: int, os: int, keep: list) -> tuple[np.ndarray, int]:
    """Jobs decoding one tensor of one block for every layer; returns (jobs, tokens)."""
    if quant.rotate or quant.center or quant.outliers:
        raise _Unsupported("scheme option")
    jobs = np.zeros((n_layers, 12), dtype=np.int64)
    if quant.bits == 16:
        x = _Source(block[prefix], n_layers)
        if x.dtype != mx.float16 or len(x.shape) != 3 or x.shape[0] != h or x.shape[2] != d:
            raise _Unsupported("f16 shape")
        t = x.shape[1]
        jobs[:, 0], jobs[:, 6] = 2, x.ptrs
        keep.append(x)
    else:
        if quant.bits not in (4, 8):
            raise _Unsupported("bits")
        q = _Source(block[f"{prefix}_q"], n_layers)
        s = _Source(block[f"{prefix}_scale"], n_layers)
        b = _Source(block[f"{prefix}_bias"], n_layers)
        keep += [q, s, b]
        if q.dtype != mx.uint8 or s.dtype != mx.float16 or b.dtype != mx.float16 or s.shape != b.shape:
            raise _Unsupported("dtypes")
        if len(q.shape) != 3 or len(s.shape) != 3 or q.shape[0] != h or s.shape[0] != h:
            raise _Unsupported("ranks")
        t = q.shape[1]
        if t < 1 or d * quant.bits % 8 or q.shape[2] != d * quant.bits // 8:
            raise _Unsupported("packed width")
        if quant.axis == "token":
            ng = s.shape[2]
            if s.shape[1] != t or ng < 1 or d % ng:
                raise _Unsupported("token groups")
            g = d // ng
            if quant.bits == 4 and g % 2:
                raise _Unsupported("odd group")
            kind = 0
        else:
            g = min(quant.group, t)
            if s.shape[1] != -(-t // g) or s.shape[2] != d or d % 2:
                raise _Unsupported("channel groups")
            kind = 1
        jobs[:, 0], jobs[:, 1], jobs[:, 5] = kind, quant.bits, g
        jobs[:, 6], jobs[:, 7], jobs[:, 8] = q.ptrs, s.ptrs, b.ptrs
    jobs[:, 2], jobs[:, 3], jobs[:, 4] = h, t, d
    jobs[:, 9] = out_ptrs + 4 * t0 * d
    jobs[:, 10] = os
    return jobs, t


def _dims(block, n_layers: int) -> tuple[int, int]:
    dims = block["dims"]
    if isinstance(dims, mx.array):
        flat = np.asarray(memoryview(dims)).reshape(-1, 2)
    else:
        flat = np.stack([np.asarray(memoryview(x)).reshape(2) for x in dims])
    if flat.shape[0] != n_layers or (flat != flat[0]).any():
        raise _Unsupported("dims")
    return int(flat[0, 0]), int(flat[0, 1])


def decode_layers(scheme, n_layers: int, blocks: list, tail_k, tail_v, dtype, step: int):
    """The working copies of `n_layers` layers: [(keys, values, offset)], each (1, H, N + headroom, D) fp32.

    `blocks`: per sealed block, a dict name -> array stacked over layers (as in a block file) or a dict
    name -> list of per-layer arrays. `tail_k`/`tail_v`: (L, H, T, D) arrays or per-layer lists (float16 or
    float32), or None. Returns None if this input is not for the C path (the caller decodes with MLX).
    """
    lib = kernels()
    if lib is None or dtype != mx.float32 or n_layers < 1:
        return None
    try:
        return _decode_layers(lib, scheme, n_layers, blocks, tail_k, tail_v, step)
    except _Unsupported:
        return None


def _decode_layers(lib, scheme, n_layers, blocks, tail_k, tail_v, step):
    if not blocks and tail_k is None:
        raise _Unsupported("empty")
    # shapes: heads and head dims from the first block (or the tail); every job checks its own
    if blocks:
        dk, dv = _dims(blocks[0], n_layers)
        first = blocks[0]["k_q" if scheme.keys.bits != 16 else "k"]
        h = (first.shape[1] if isinstance(first, mx.array) else first[0].shape[0])
    else:
        tk = tail_k if isinstance(tail_k, mx.array) else tail_k[0]
        tv = tail_v if isinstance(tail_v, mx.array) else tail_v[0]
        h, dk, dv = tk.shape[-3], tk.shape[-1], tv.shape[-1]
    keep: list = []
    tails = None
    n_tail = 0
    if tail_k is not None:
        tails = (_Source(tail_k, n_layers), _Source(tail_v, n_layers))
        for src, d in zip(tails, (dk, dv)):
            if len(src.shape) != 3 or src.shape[0] != h or src.shape[2] != d or src.dtype not in (mx.float16, mx.float32):
                raise _Unsupported("tail shape")
        if tails[0].shape[1] != tails[1].shape[1]:
            raise _Unsupported("tail lengths")
        n_tail = tails[0].shape[1]
    # block lengths first (to size the buffers): every block's keys and values must agree
    lengths = []
    for block in blocks:
        if _dims(block, n_layers) != (dk, dv):
            raise _Unsupported("dims differ")
        a = block["k_q" if scheme.keys.bits != 16 else "k"]
        lengths.append(a.shape[2] if isinstance(a, mx.array) else a[0].shape[1])
    n = sum(lengths) + n_tail
    if n == 0:
        raise _Unsupported("no tokens")
    cap = n + (-n) % step
    keys = [mx.zeros((1, h, cap, dk), mx.float32) for _ in range(n_layers)]
    values = [mx.zeros((1, h, cap, dv), mx.float32) for _ in range(n_layers)]
    mx.eval(keys, values)
    kp = np.array([_buf(x).ctypes.data for x in keys], dtype=np.int64)
    vp = np.array([_buf(x).ctypes.data for x in values], dtype=np.int64)
    jobs = []
    t0 = 0
    for block, length in zip(blocks, lengths):
        jk, tk_ = _tensor_jobs(scheme.keys, block, "k", n_layers, h, dk, kp, t0, cap * dk, keep)
        jv, tv_ = _tensor_jobs(scheme.values, block, "v", n_layers, h, dv, vp, t0, cap * dv, keep)
        if tk_ != length or tv_ != length:
            raise _Unsupported("block lengths")
        jobs += [jk, jv]
        t0 += length
    if tails is not None and n_tail:
        for src, d, ptrs in ((tails[0], dk, kp), (tails[1], dv, vp)):
            j = np.zeros((n_layers, 12), dtype=np.int64)
            j[:, 0] = 2 if src.dtype == mx.float16 else 3
            j[:, 2], j[:, 3], j[:, 4] = h, n_tail, d
            j[:, 6] = src.ptrs
            j[:, 9] = ptrs + 4 * t0 * d
            j[:, 10] = cap * d
            jobs.append(j)
    table = np.ascontiguousarray(np.concatenate(jobs))
    lib.kv_decode_jobs(_lut.ctypes.data, table.shape[0], table.ctypes.data)
    del keep
    return [(k, v, n) for k, v in zip(keys, values)]
