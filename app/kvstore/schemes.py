"""How a sealed 256-token block of keys and values is stored: quantization schemes.

A scheme turns one block of one layer — keys and values of shape
(n_kv_heads, T, head_dim) — into named arrays (`encode`) and back (`decode`).
The live cache replaces the working copy of each sealed block with
`decode(encode(block))`, so a cache restored from disk is bit-identical to the
live one. Schemes only see whole blocks (T = 256 in practice; any T >= 1 works),
so they may use per-block statistics such as per-channel key ranges.

All arithmetic is plain MLX ops on the CPU, deterministic; codes are packed into
uint8, scales and biases are float16. `bits_per_element` counts everything that
is stored (codes, scales, biases, means) for a 256-token block of head_dim 64.

Measured (SmolLM2-135M, fp32 CPU; first 2,048 tokens of app/bench/texts/jargon-file-4.4.7.txt fed in
128-token chunks through `app.kvstore.quality.SealingKVCache`, 256-token blocks; exact cache ppl 30.7867;
"ch G" = per channel over groups of G tokens, "tok G" = per token over groups of G channels; "rot" = a 64x64
Hadamard rotation of the head dimension, undone on decode):

    scheme (keys / values, bits)                         bits/elem   ppl delta
    f16                                                     16.0      -0.00%
    q8    8 tok 64 / 8 tok 64                                8.5      +0.12%
    k8v4  8 tok 64 / 4 tok 64                                6.5      +0.64%
    4 tok 64 / 4 tok 64 (mlx-lm QuantizedKVCache)            4.5      +7.57%
    4 ch 256 / 4 tok 64 (KIVI over the whole block)          4.3125   +3.78%
    4 ch 256 / 4 tok 64 rot                                  4.3125   +3.29% (+2.69% from an identical fake-quant run: unexplained)
    4 ch 256 / exact values                                   -       +2.37%
    4 ch 256, 2-8 bits per channel by log-std (slope 1 / 2)  ~4.35    +2.73% / +3.81%
    4 tok 64 rot / 4 tok 64 (QuaRot-style keys)              4.5      +4.00%
    4 ch 128 / 4 tok 64                                      4.375    +1.29%
    4 ch 128 / 4 tok 64 rot                                  4.375    +1.73%
    4 ch 64 / 4 tok 64 rot                                   4.5      +1.92%
    q4    4 ch 64 / 4 tok 64                                 4.5      +1.25%   <- the default

The keys are what breaks (values 4-bit alone cost ~0.6%). Per-channel key ranges
over 64-token groups inside the block are what fixes them: the block's per-channel
ranges are dominated by a few tokens, and smaller token groups track them. Rotating
the values, rotating the keys, and spending bits unevenly across channels did not
help on this model. Differences under ~0.5% at 2K should not be over-read (a
quantized run can move a few tenths of a percent between runs; exact runs repeat).

`parley bench quality` (2K / 8K tokens; exact 30.7867 / 32.2990): f16 -0.00% / -0.00%,
q8 +0.06% / +0.04%, k8v4 +0.69% / +0.38%, q4 +1.25% / +1.39%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import mlx.core as mx

from app.errors import ParleyError

BLOCK_TOKENS = 256
"""The block length `bits_per_element` is computed for."""
REF_HEAD_DIM = 64


class Scheme(Protocol):
    name: str
    bits_per_element: float

    def encode(self, keys: mx.array, values: mx.array) -> dict[str, mx.array]: ...

    def decode(self, arrays: dict[str, mx.array], dtype: mx.Dtype) -> tuple[mx.array, mx.array]: ...


# ---------------------------------------------------------------------------
# bit packing: codes (..., D) with values < 2**bits -> uint8 (..., D * bits / 8)


def _pack(codes: mx.array, bits: int) -> mx.array:
    codes = codes.astype(mx.uint8)
    if bits == 8:
        return codes
    *lead, d = codes.shape
    if bits in (1, 2, 4):
        per = 8 // bits
        c = codes.reshape(*lead, d // per, per).astype(mx.uint8)
        out = c[..., 0]
        for i in range(1, per):
            out = out | (c[..., i] << (bits * i))
        return out
    # generic: 8 codes -> `bits` bytes through a uint64 word
    c = codes.reshape(*lead, d // 8, 8).astype(mx.uint64)
    shifts = mx.array([bits * i for i in range(8)], dtype=mx.uint64)
    word = mx.sum(c << shifts, axis=-1)
    bshift = mx.array([8 * j for j in range(bits)], dtype=mx.uint64)
    by = (word[..., None] >> bshift) & mx.array(255, dtype=mx.uint64)
    return by.astype(mx.uint8).reshape(*lead, (d // 8) * bits)


def _unpack(packed: mx.array, bits: int, d: int) -> mx.array:
    if bits == 8:
        return packed
    *lead, _ = packed.shape
    mask = (1 << bits) - 1
    if bits in (1, 2, 4):
        per = 8 // bits
        parts = [(packed >> (bits * i)) & mask for i in range(per)]
        return mx.stack(parts, axis=-1).reshape(*lead, d)
    by = packed.reshape(*lead, d // 8, bits).astype(mx.uint64)
    bshift = mx.array([8 * j for j in range(bits)], dtype=mx.uint64)
    word = mx.sum(by << bshift, axis=-1)
    shifts = mx.array([bits * i for i in range(8)], dtype=mx.uint64)
    codes = (word[..., None] >> shifts) & mx.array(mask, dtype=mx.uint64)
    return codes.astype(mx.uint8).reshape(*lead, d)


def _hadamard(d: int) -> mx.array:
    """An orthonormal d x d rotation: Sylvester Hadamard for powers of two, else a fixed random orthogonal."""
    if d & (d - 1) == 0:
        h = mx.array([[1.0]])
        while h.shape[0] < d:
            h = mx.concatenate([mx.concatenate([h, h], 1), mx.concatenate([h, -h], 1)], 0)
        return h / math.sqrt(d)
    import numpy as np

    q, r = np.linalg.qr(np.random.default_rng(1234).standard_normal((d, d)))
    return mx.array((q * np.sign(np.diag(r))).astype("float32"))


_ROTATIONS: dict[int, mx.array] = {}


def _rotation(d: int) -> mx.array:
    if d not in _ROTATIONS:
        _ROTATIONS[d] = _hadamard(d)
    return _ROTATIONS[d]


# ---------------------------------------------------------------------------
# one tensor's quantizer


@dataclass(frozen=True)
class TensorQuant:
    """Affine quantization of a (H, T, D) tensor.

    axis="token": groups of `group` along the head dimension, one scale/bias per token and group.
    axis="channel": groups of `group` tokens along the token axis, one scale/bias per channel and group (KIVI).
    bits=16: stored as float16, no quantization.
    rotate: multiply the head dimension by an orthonormal Hadamard matrix first (undone on decode).
    center: subtract a per-channel (per-block) mean first, stored in float16.
    outliers: this many channels per head (largest absolute value in the block) kept in float16.
    """

    bits: int = 4
    axis: str = "token"
    group: int = 64
    rotate: bool = False
    center: bool = False
    outliers: int = 0

    def bits_per_element(self, t: int = BLOCK_TOKENS, d: int = REF_HEAD_DIM) -> float:
        if self.bits == 16:
            return 16.0
        extent = d if self.axis == "token" else t
        g = min(self.group, extent)
        n_groups = math.ceil(extent / g)
        per = self.bits + 32.0 * n_groups / extent
        if self.center:
            per += 16.0 / t
        if self.outliers:
            # the outlier channels' (zeroed) codes stay in the packed array; their float16 values and a
            # uint8 channel index per head come on top
            per += self.outliers * 16.0 / d + self.outliers * 8.0 / (t * d)
        return per

    # -- encode ---------------------------------------------------------------
    def encode(self, x: mx.array, prefix: str) -> dict[str, mx.array]:
        x = x.astype(mx.float32)
        h, t, d = x.shape
        out: dict[str, mx.array] = {}
        if self.bits == 16:
            return {f"{prefix}": x.astype(mx.float16)}
        if self.rotate:
            x = x @ _rotation(d)
        if self.outliers:
            idx = mx.argsort(-mx.max(mx.abs(x), axis=1), axis=-1)[:, : self.outliers]  # (H, n)
            idx = mx.sort(idx, axis=-1).astype(mx.uint8)
            sel = mx.take_along_axis(x, mx.broadcast_to(idx[:, None, :].astype(mx.int32), (h, t, self.outliers)), axis=2)
            out[f"{prefix}_oidx"] = idx
            out[f"{prefix}_oval"] = sel.astype(mx.float16)
            # zero the outlier channels so they don't stretch the ranges (mean of their group would be better
            # for per-token groups; zero is fine for per-channel groups, which they form alone)
            onehot = mx.sum(mx.arange(d)[None, :, None] == idx[:, None, :].astype(mx.int32), axis=-1) > 0  # (H, D)
            x = mx.where(onehot[:, None, :], mx.zeros_like(x), x)
        if self.center:
            mean = mx.mean(x, axis=1, keepdims=True).astype(mx.float16)
            out[f"{prefix}_mean"] = mean
            x = x - mean.astype(mx.float32)
        levels = (1 << self.bits) - 1
        if self.axis == "token":
            g = min(self.group, d)
            if d % g:
                raise ParleyError(f"head_dim {d} is not a multiple of the quantization group {g}")
            xg = x.reshape(h, t, d // g, g)
            lo = mx.min(xg, axis=-1, keepdims=True)
            hi = mx.max(xg, axis=-1, keepdims=True)
        else:
            g = min(self.group, t)
            n = math.ceil(t / g)
            pad = n * g - t
            xp = mx.concatenate([x, mx.repeat(x[:, -1:, :], pad, axis=1)], axis=1) if pad else x
            xg = xp.reshape(h, n, g, d)
            lo = mx.min(xg, axis=2, keepdims=True)
            hi = mx.max(xg, axis=2, keepdims=True)
        scale = ((hi - lo) / levels).astype(mx.float16)
        bias = lo.astype(mx.float16)
        s32 = scale.astype(mx.float32)
        b32 = bias.astype(mx.float32)
        safe = mx.where(s32 == 0, mx.ones_like(s32), s32)
        q = mx.clip(mx.round((xg - b32) / safe), 0, levels)
        if self.axis == "token":
            codes = q.reshape(h, t, d)
            out[f"{prefix}_scale"] = scale.squeeze(-1)
            out[f"{prefix}_bias"] = bias.squeeze(-1)
        else:
            codes = q.reshape(h, n * g, d)[:, :t, :]
            out[f"{prefix}_scale"] = scale.squeeze(2)
            out[f"{prefix}_bias"] = bias.squeeze(2)
        out[f"{prefix}_q"] = _pack(codes, self.bits)
        return out

    # -- decode ---------------------------------------------------------------
    def decode(self, arrays: dict[str, mx.array], prefix: str, d: int) -> mx.array:
        if self.bits == 16:
            return arrays[prefix].astype(mx.float32)
        codes = _unpack(arrays[f"{prefix}_q"], self.bits, d).astype(mx.float32)
        h, t, _ = codes.shape
        scale = arrays[f"{prefix}_scale"].astype(mx.float32)
        bias = arrays[f"{prefix}_bias"].astype(mx.float32)
        if self.axis == "token":
            g = d // scale.shape[-1]
            x = (codes.reshape(h, t, d // g, g) * scale[..., None] + bias[..., None]).reshape(h, t, d)
        else:
            g = min(self.group, t)
            s = mx.repeat(scale, g, axis=1)[:, :t, :]
            b = mx.repeat(bias, g, axis=1)[:, :t, :]
            x = codes * s + b
        if self.center:
            x = x + arrays[f"{prefix}_mean"].astype(mx.float32)
        if self.outliers:
            idx = arrays[f"{prefix}_oidx"].astype(mx.int32)
            val = arrays[f"{prefix}_oval"].astype(mx.float32)
            x = mx.put_along_axis(x, mx.broadcast_to(idx[:, None, :], val.shape), val, axis=2)
        if self.rotate:
            x = x @ _rotation(d).T
        return x


@dataclass(frozen=True)
class KVScheme:
    name: str
    keys: TensorQuant
    values: TensorQuant
    description: str = ""
    version: int = 1  # bump when the encoding changes: stored caches of another version become misses
    bits_per_element: float = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "bits_per_element", (self.keys.bits_per_element() + self.values.bits_per_element()) / 2)

    def encode(self, keys: mx.array, values: mx.array) -> dict[str, mx.array]:
        if keys.ndim != 3 or values.ndim != 3 or keys.shape[:2] != values.shape[:2]:
            raise ValueError(f"expected keys/values (n_kv_heads, T, head_dim), got {keys.shape} and {values.shape}")
        out = self.keys.encode(keys, "k")
        out.update(self.values.encode(values, "v"))
        # the head dims are needed to unpack; keep them in the stored shapes, not metadata
        out["dims"] = mx.array([keys.shape[2], values.shape[2]], dtype=mx.int32)
        mx.eval(out)
        return out

    def decode(self, arrays: dict[str, mx.array], dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        dk, dv = (int(v) for v in arrays["dims"].tolist())
        k = self.keys.decode(arrays, "k", dk).astype(dtype)
        v = self.values.decode(arrays, "v", dv).astype(dtype)
        return k, v


SCHEMES: dict[str, KVScheme] = {
    "q4": KVScheme(
        "q4",
        keys=TensorQuant(bits=4, axis="channel", group=64),
        values=TensorQuant(bits=4, axis="token", group=64),
        description="keys 4-bit per channel in groups of 64 tokens, values 4-bit per token in groups of 64 channels",
    ),
    "k8v4": KVScheme(
        "k8v4",
        keys=TensorQuant(bits=8, axis="token", group=64),
        values=TensorQuant(bits=4, axis="token", group=64),
        description="keys 8-bit, values 4-bit, per token group 64",
    ),
    "q8": KVScheme(
        "q8",
        keys=TensorQuant(bits=8, axis="token", group=64),
        values=TensorQuant(bits=8, axis="token", group=64),
        description="keys and values 8-bit per token group 64",
    ),
    "f16": KVScheme("f16", keys=TensorQuant(bits=16), values=TensorQuant(bits=16), description="float16"),
}
DEFAULT = "q4"


def get_scheme(name: str | None) -> KVScheme:
    key = DEFAULT if name is None else name
    try:
        return SCHEMES[key]
    except KeyError:
        raise ParleyError(f"Unknown KV cache scheme {name!r}; choose one of: {', '.join(SCHEMES)}") from None
