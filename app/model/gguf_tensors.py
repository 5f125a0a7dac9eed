"""GGUF tensors into MLX arrays, through the `gguf` package's own readers and dequantizers.

The affine ggml types (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K) are, per group of 32
weights, w = s * q + b with integer codes q: exactly MLX's affine layout
(group 32, 4/8/5 bits). So instead of re-quantizing (lossy), each tensor is
dequantized by `gguf.quants.dequantize`, the per-group s and b are read from
the block headers, and the codes q = (w - b) / s are recovered exactly and
packed the way MLX packs them (a little-endian bit stream in uint32 words).
Scales and biases are kept in fp32 (d * sc of the K types is not fp16-exact).
Q6_K's 16-weight sub-blocks have no MLX layout: it becomes fp16 (relative
rounding at most 2^-11). F32 / F16 / BF16 stay as they are.
"""

from __future__ import annotations

import numpy as np

from app.errors import ParleyError

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
GROUP = 32
_ROWS_AT_ONCE = 1024  # bounds the temporary memory of dequantizing and packing one tensor


def tensor_to_mlx(tensor, name: str) -> dict[str, object]:
    """{"weight": ..., and for quantized types "scales"/"biases"} as MLX arrays, plus "bits" (None: unquantized).

    `tensor` is a `gguf.ReaderTensor`; shapes come out in MLX/PyTorch order (rows first)."""
    import mlx.core as mx

    kind = tensor.tensor_type.name
    shape = tuple(int(n) for n in reversed(tensor.shape))
    if kind not in SUPPORTED_TYPES:
        raise ParleyError(f"tensor {name} has type {kind}, which Parley cannot convert. "
                          f"Supported GGUF tensor types: {', '.join(SUPPORTED_TYPES)}.")
    if kind == "F32":
        return {"weight": mx.array(np.asarray(tensor.data, dtype=np.float32).reshape(shape)), "bits": None}
    if kind == "F16":
        return {"weight": mx.array(np.asarray(tensor.data).view(np.float16).reshape(shape)), "bits": None}
    if kind == "BF16":
        raw = np.asarray(tensor.data).view(np.uint16).reshape(shape)
        return {"weight": mx.array((raw.astype(np.uint32) << 16).view(np.float32)).astype(mx.bfloat16), "bits": None}
    rows = int(np.prod(shape[:-1]))
    blocks = np.asarray(tensor.data).reshape(rows, -1)
    if kind == "Q6_K":
        w = np.concatenate([_dequantize(blocks[i:i + _ROWS_AT_ONCE], kind) for i in range(0, rows, _ROWS_AT_ONCE)])
        return {"weight": mx.array(w.astype(np.float16).reshape(shape)), "bits": None}
    bits = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_K": 5}[kind]
    packed, scales, biases = [], [], []
    for i in range(0, rows, _ROWS_AT_ONCE):
        part = blocks[i:i + _ROWS_AT_ONCE]
        w = _dequantize(part, kind).reshape(len(part), -1, GROUP)
        s, b = _scale_bias(part, kind)
        safe = np.where(s == 0, 1, s)[..., None]
        q = np.clip(np.rint((w - b[..., None]) / safe), 0, 2**bits - 1).astype(np.uint8)
        packed.append(_pack(q.reshape(len(part), -1), bits))
        scales.append(s)
        biases.append(b)
    cols = shape[-1]
    out_shape = (*shape[:-1], cols * bits // 32)
    return {"weight": mx.array(np.concatenate(packed).reshape(out_shape)),
            "scales": mx.array(np.concatenate(scales).reshape(*shape[:-1], cols // GROUP)),
            "biases": mx.array(np.concatenate(biases).reshape(*shape[:-1], cols // GROUP)), "bits": bits}


def _dequantize(blocks: np.ndarray, kind: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(np.ascontiguousarray(blocks), GGMLQuantizationType[kind]).astype(np.float32, copy=False)


def _scale_bias(blocks: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Per group of 32 weights (rows, groups): s and b of w = s * q + b, computed as gguf's dequantizer does."""
    rows = blocks.shape[0]
    if kind in ("Q4_0", "Q4_1", "Q8_0"):
        size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind]
        b = blocks.reshape(rows, -1, size)
        d = np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)
        if kind == "Q4_1":
            return d, np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0].astype(np.float32)
        return d, d * np.float32(-8 if kind == "Q4_0" else -128)
    from gguf.quants import Q4_K

    size = 144 if kind == "Q4_K" else 176
    b = blocks.reshape(-1, size)
    d = np.ascontiguousarray(b[:, 0:2]).view(np.float16).astype(np.float32)  # (n, 1)
    dmin = np.ascontiguousarray(b[:, 2:4]).view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
    s = d * sc.astype(np.float32)
    bias = -(dmin * m.astype(np.float32))
    return s.reshape(rows, -1), bias.reshape(rows, -1)


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Codes (rows, n) into MLX's packing: a little-endian bit stream in uint32 words."""
    if bits == 8:
        return np.ascontiguousarray(q).view(np.uint32)
    if bits == 4:
        q32 = q.reshape(q.shape[0], -1, 8).astype(np.uint32)
        return np.bitwise_or.reduce(q32 << (np.arange(8, dtype=np.uint32) * 4), axis=-1)
    stream = ((q[..., None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(q.shape[0], -1)
    return np.packbits(stream, axis=-1, bitorder="little").view(np.uint32)
