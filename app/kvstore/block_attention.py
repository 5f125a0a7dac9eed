"""Decode-step attention straight over sealed blocks as they are stored (4/8-bit or float16) plus the tail.

An active conversation used to keep an fp32 working copy of every sealed block
(8K tokens of SmolLM2: ~380 MB) only so that attention could read it. The C
kernel in `app/csrc/q4_attention.c` reads the encoded blocks themselves,
dequantizing each key and value row inside the attention (the same numbers
`schemes.decode` gives), so a conversation's RAM is its encoded bytes plus the
full-precision tail, and a restore has nothing to decode.

`BlockTable` holds the addresses of one layer's encoded blocks (MLX arrays made
by sealing, or the host buffers of block files read from disk: no copies), and
`attend` runs one query position over them. Only the plain schemes apply (4/8-bit
affine per token or per channel, float16; no rotation, centering or outliers);
`tensor_spec` says None otherwise and the cache keeps its fp32 working copy.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping

import mlx.core as mx
import numpy as np

from app.kvstore.blockfile import HostTensor
from app.kvstore.host_block import LayerBlock
from app.model import cpu_kernels

ISA_PORTABLE, ISA_AVX2 = 0, 1

_lib: ctypes.CDLL | None | bool = False  # False: not tried yet
_lut: np.ndarray | None = None
_lut_ptr = 0


class Unsupported(Exception):
    """This block or scheme is not for the kernel; the cache keeps an fp32 working copy instead."""


def kernels() -> ctypes.CDLL | None:
    """The C kernels with `kvq_attn_decode` (app/csrc/q4_attention.c), or None (no compiler,
    `PARLEY_CPU_KERNELS=0`, not Linux); loads the float16 table once."""
    global _lib, _lut, _lut_ptr
    if _lib is False:
        _lib = cpu_kernels.kernels()
        _lut = cpu_kernels.float16_table() if _lib is not None else None
        _lut_ptr = _lut.ctypes.data if _lut is not None else 0
    return _lib


def best_isa() -> int:
    """The instruction-set path `attend` uses by default: AVX2 where the active kernel variant has it
    (`PARLEY_KERNELS=portable` makes it the plain C loops)."""
    lib = kernels()
    if lib is None:
        return ISA_PORTABLE
    return ISA_AVX2 if lib.kvq_has_avx2() else ISA_PORTABLE


def tensor_spec(quant) -> tuple[int, int, int] | None:
    """(kind, bits, group) of one tensor's quantizer for the kernel, or None if it does not apply.

    The group of a channel-axis quantizer is checked against each block (`min(group, T)`)."""
    if quant.rotate or quant.center or quant.outliers:
        return None
    if quant.bits == 16:
        return (2, 16, 0)
    if quant.bits not in (4, 8):
        return None
    return (0 if quant.axis == "token" else 1, quant.bits, quant.group)


def scheme_applies(scheme) -> bool:
    return tensor_spec(scheme.keys) is not None and tensor_spec(scheme.values) is not None


def _address(block: Mapping, name: str, index_arrays: list) -> tuple[int, tuple, object]:
    """(address, one layer's shape, dtype) of tensor `name` of one layer's block, without copying it."""
    if isinstance(block, LayerBlock):
        t: HostTensor = block.host[name]
        data = t.data
        if not data.flags.c_contiguous:
            raise Unsupported("non-contiguous block file tensor")
        step = data.nbytes // data.shape[0]
        return data.ctypes.data + step * block.index, tuple(data.shape[1:]), t.dtype
    a = block[name]
    view = np.asarray(memoryview(a))
    if not view.flags.c_contiguous:
        raise Unsupported("non-contiguous block array")
    index_arrays.append(view)
    return view.ctypes.data, tuple(a.shape), a.dtype


def _tensor_row(spec, block, prefix: str, h: int, d: int, keep: list) -> tuple[list[int], int, int]:
    """Addresses (q, s, b) of one tensor of one block, its token count, and its group."""
    kind, bits, group = spec
    if kind == 2:
        addr, shape, dtype = _address(block, prefix, keep)
        if dtype != mx.float16 or len(shape) != 3 or shape[0] != h or shape[2] != d:
            raise Unsupported("float16 block shape")
        return [addr, 0, 0], shape[1], 0
    q, qshape, qdtype = _address(block, f"{prefix}_q", keep)
    s, sshape, sdtype = _address(block, f"{prefix}_scale", keep)
    b, bshape, bdtype = _address(block, f"{prefix}_bias", keep)
    if qdtype != mx.uint8 or sdtype != mx.float16 or bdtype != mx.float16 or sshape != bshape:
        raise Unsupported("block dtypes")
    if len(qshape) != 3 or len(sshape) != 3 or qshape[0] != h or sshape[0] != h or qshape[2] * 8 != d * bits:
        raise Unsupported("block shape")
    t = qshape[1]
    if kind == 0:
        ng = sshape[2]
        if sshape[1] != t or ng < 1 or d % ng:
            raise Unsupported("token groups")
        g = d // ng
    else:
        g = min(group, t)
        if sshape[1] != -(-t // g) or sshape[2] != d:
            raise Unsupported("channel groups")
    if bits == 4 and (g % 2 if kind == 0 else d % 2):
        raise Unsupported("odd 4-bit group")
    return [q, s, b], t, g


class BlockTable:
    """One layer's sealed blocks as the kernel reads them: 8 longs a block (k q/s/b, v q/s/b, T, 0).

    `sync` follows the cache's `sealed` list (appended to by sealing, cut by trims) and
    re-reads only what changed; the blocks themselves keep their memory alive.
    """

    def __init__(self, scheme, heads: int, dk: int, dv: int):
        self.kspec, self.vspec = tensor_spec(scheme.keys), tensor_spec(scheme.values)
        if self.kspec is None or self.vspec is None:
            raise Unsupported("scheme")
        self.h, self.dk, self.dv = heads, dk, dv
        self.rows = np.zeros((0, 8), np.int64)
        self.blocks: list = []
        self.groups: tuple[int, int] | None = None
        self._keep: list = []
        self._refresh()

    def _refresh(self) -> None:
        """What each `attend` passes the kernel, computed once per change of the blocks (not per call):
        the sealed token count, the two tensor specs and the rows' address."""
        self._tokens = int(self.rows[:, 6].sum())
        self._specs = self._spec_arrays()
        self._rows_arg = (self.rows.shape[0], self.rows.ctypes.data)

    def sync(self, sealed: list) -> None:
        n = 0
        while n < min(len(sealed), len(self.blocks)) and sealed[n] is self.blocks[n]:
            n += 1
        if n == len(sealed) == len(self.blocks):
            return
        rows = [self.rows[:n]]
        for block in sealed[n:]:
            rows.append(np.array([self._row(block)], np.int64))
        self.rows = np.ascontiguousarray(np.concatenate(rows))
        self.blocks = list(sealed)
        self._refresh()

    def _row(self, block) -> list[int]:
        kp, tk, gk = _tensor_row(self.kspec, block, "k", self.h, self.dk, self._keep)
        vp, tv, gv = _tensor_row(self.vspec, block, "v", self.h, self.dv, self._keep)
        if tk != tv or (self.groups is not None and self.groups != (gk, gv)):
            raise Unsupported("blocks differ")
        self.groups = (gk, gv)
        return [*kp, *vp, tk, 0]

    @property
    def tokens(self) -> int:
        return self._tokens

    def specs(self) -> tuple[np.ndarray, np.ndarray]:
        return self._specs

    def _spec_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        gk, gv = self.groups or (self.kspec[2], self.vspec[2])
        return (np.array([self.kspec[0], self.kspec[1], gk], np.int64),
                np.array([self.vspec[0], self.vspec[1], gv], np.int64))


def attend(table: BlockTable, q: np.ndarray, tail_k: np.ndarray | None, tail_v: np.ndarray | None,
           n_tail: int, scale: float, isa: int | None = None) -> np.ndarray:
    """softmax(scale q K^T) V for one query position over `table`'s blocks then `n_tail` tail rows.

    q: H * dk fp32 (contiguous). tail_k/tail_v: fp32 (Hkv, cap, d) with contiguous rows (cap >= n_tail;
    heads may be further apart), or None when n_tail is 0. Returns H * dv fp32.
    Called once per layer and token: what does not change between calls (specs, token count, the
    kernel's ISA) is computed once, in the table or at load.
    """
    lib = kernels()
    if lib is None:
        raise Unsupported("no kernel")
    if q.dtype != np.float32 or not q.flags.c_contiguous:
        q = np.ascontiguousarray(q, np.float32)
    H = q.size // table.dk
    if H * table.dk != q.size or H % table.h:
        raise Unsupported("query heads")
    total = table._tokens + n_tail
    if total < 1:
        raise Unsupported("nothing to attend to")
    out = np.empty(H * table.dv, np.float32)
    scratch = np.empty((H // table.h) * total, np.float32)
    kspec, vspec = table._specs
    tk_ptr = tv_ptr = tk_hs = tv_hs = 0
    if n_tail:
        tk_hs, tv_hs = _head_stride(tail_k, table.dk, n_tail), _head_stride(tail_v, table.dv, n_tail)
        tk_ptr, tv_ptr = tail_k.ctypes.data, tail_v.ctypes.data
    lib.kvq_attn_decode(_lut_ptr, q.ctypes.data, out.ctypes.data, scratch.ctypes.data,
                        H, table.h, table.dk, table.dv, float(scale), kspec.ctypes.data, vspec.ctypes.data,
                        *table._rows_arg, tk_ptr, tv_ptr, n_tail, tk_hs, tv_hs,
                        ISA_AVX2 if isa is None else isa)  # the kernel takes AVX2 only where its variant has it
    return out


def attend_rows(table: BlockTable, q: np.ndarray, tail_k: np.ndarray | None, tail_v: np.ndarray | None, n_tail: int,
                scale: float, isa: int | None = None) -> np.ndarray:
    """Causal softmax(scale q K^T) V for a short chunk: the L query rows of `q` (H, L, dk) fp32 are the last L
    positions of `table`'s blocks then `n_tail` tail rows (tail_k/tail_v as for `attend`; None when n_tail is
    0). Returns (L, H * dv) fp32: the rows o_proj takes. Row l sees positions up to its own.
    The kernel (app/csrc/q4_attention_rows.c) agrees with attention over the decoded blocks within fp32
    rounding, bitwise the same on any thread count."""
    lib = kernels()
    if lib is None:
        raise Unsupported("no kernel")
    if q.ndim != 3 or q.shape[2] != table.dk or q.shape[0] % table.h:
        raise Unsupported("query shape")
    H, L = q.shape[0], q.shape[1]
    if L < 1 or table.tokens + n_tail < L:
        raise Unsupported("fewer positions than query rows")
    q = np.ascontiguousarray(q, np.float32)
    out = np.empty((L, H * table.dv), np.float32)
    kspec, vspec = table._specs
    tk_ptr = tv_ptr = tk_hs = tv_hs = 0
    if n_tail:
        tk_hs, tv_hs = _head_stride(tail_k, table.dk, n_tail), _head_stride(tail_v, table.dv, n_tail)
        tk_ptr, tv_ptr = tail_k.ctypes.data, tail_v.ctypes.data
    failed = lib.kvq_attn_rows(_lut_ptr, q.ctypes.data, out.ctypes.data, H, table.h, L, table.dk, table.dv,
                               float(scale), kspec.ctypes.data, vspec.ctypes.data, *table._rows_arg,
                               tk_ptr, tv_ptr, n_tail, tk_hs, tv_hs,
                               ISA_AVX2 if isa is None else isa)
    if failed:
        raise Unsupported("no memory for the scores")
    return out


def _head_stride(x: np.ndarray, d: int, n: int) -> int:
    if x.dtype != np.float32 or x.ndim != 3 or x.shape[2] != d or x.shape[1] < n or x.strides[2] != 4 \
            or x.strides[1] != 4 * d or x.strides[0] % 4:
        raise Unsupported("tail layout")
    return x.strides[0] // 4
