"""Quantized linear and embedding layers retyped for MLX's CPU backend, expanded to fp32 only when BLAS needs it.

Prefill of many rows runs fastest as an fp32 BLAS sgemm (app.model.cpu_fast), so a quantized layer is
multiplied through its fp32 copy there. Building those copies for the embedded model (540 MB) used to be
most of `parley chat`'s start-up (1-2 s on the 2-core machines: dequantizing, and the page faults of fresh
memory), and most starts never need them: a turn that resumes a cached conversation prefills only the new
message (a few dozen rows), and decode reads the 4-bit weights (`q4_gemv`). So the layers keep their
quantized parameters, and

* one row goes through the 4/8-bit gemv, as before;
* up to `SHORT_ROWS` rows go through the row-batched 4/8-bit kernel (`q4_rows`, the gemv's arithmetic for up
  to 8 rows a call): the same weights, summed in another order than sgemm, so within fp32 rounding of the
  fp32 path (tests/test_cpu_linear.py);
* more rows (or no usable 4-bit kernel) use the layer's fp32 copy, built on that first call (`fp32_weight`)
  exactly as the eager rewrite built it (fp32 scales: no fp16 rounding) and kept: bitwise today's weights.
  The threaded C dequantizer builds it (`dequantized_in_c`, app/csrc/dequant.c, bitwise mx.dequantize), as
  this expansion sits inside the first long prompt's time to first token; MLX's own where it does not apply.

`EXPANDED` counts the copies built in this process (tests: a short turn builds none, a long one each once).
"""

from __future__ import annotations

import mlx.core as mx

from app.model.cpu_kernels import kernels
from app.model.host_exec import Q4Weights, host_vector

# Rows up to which the 4-bit kernels are used. Measured on the shared 2-core AVX2 machine (busy), a prefill of N new
# tokens through the embedded model, fp32 copies already built: N=16 0.16-0.48 s (4-bit) vs 0.50-0.67 s (sgemm),
# N=32 0.46-0.61 vs 0.70-0.76 s, N=48 0.46-1.09 vs 0.78-0.89 s; and the 4-bit path never builds the copies.
SHORT_ROWS = 32
ROWS_PER_CALL = 8  # the row kernel keeps up to 8 rows' accumulators in registers (app/csrc/quant_rows.h)
EXPANDED = {"layers": 0}


def dequantized(m) -> mx.array:
    """The fp32 weight of quantized layer `m`: fp32 scales/biases (dequantizing in fp16 would round every weight
    to fp16, ~0.2% off in the logits). Through the C kernel where it takes the layer (`dequantized_in_c`),
    else MLX's dequantize: the same bits either way."""
    w = dequantized_in_c(m)
    if w is not None:
        return w
    f32 = lambda a: a.astype(mx.float32)  # noqa: E731
    return mx.dequantize(m.weight, f32(m.scales), f32(m.biases), m.group_size, m.bits).astype(mx.float32)


def dequantized_in_c(m) -> mx.array | None:
    """`dequantized(m)` by the threaded C kernel (app/csrc/dequant.c: one pass, w = s * q + b rounded as MLX
    rounds it, bitwise mx.dequantize's; MLX's runs five single-threaded passes, ~1 s of the embedded model's
    first long prefill), evaluated; None for a layer it does not take (not affine 4/8-bit, no kernels)."""
    import numpy as np

    from app.model.cpu_kernels import data_pointer, fresh

    k = kernels()
    if (k is None or getattr(m, "mode", "affine") != "affine" or "biases" not in m or m.bits not in (4, 8)
            or m.weight.dtype != mx.uint32 or m.weight.ndim != 2):
        return None
    O, K = m.weight.shape[0], m.weight.shape[1] * 32 // m.bits
    f32 = lambda a: np.ascontiguousarray(np.asarray(a.astype(mx.float32)))  # noqa: E731
    codes, scales, biases = np.ascontiguousarray(np.asarray(m.weight).view(np.uint8)), f32(m.scales), f32(m.biases)
    if scales.shape != (O, K // m.group_size) or biases.shape != scales.shape:
        return None
    out = fresh(mx.zeros((O, K), mx.float32))
    done = k.dequantize_rows(codes.ctypes.data, scales.ctypes.data, biases.ctypes.data, data_pointer(out), O, K,
                             m.group_size, m.bits)
    return out if done == 0 else None


def fp32_weight(m) -> mx.array:
    """The layer's fp32 weight, built (and evaluated) on the first call and kept outside the parameter tree."""
    w = m.__dict__.get("_fp32")
    if w is None:
        w = dequantized(m)
        mx.eval(w)
        object.__setattr__(m, "_fp32", w)
        EXPANDED["layers"] += 1
    return w


def prepare(m) -> None:
    """Keep the layer's 4-bit weights for the C kernels where they apply (numpy views, no copy of the codes)."""
    object.__setattr__(m, "_q4", Q4Weights.of(m) if Q4Weights.usable(m) else None)
    object.__setattr__(m, "_fp32", None)


def rows_q4(q4: Q4Weights, x: mx.array) -> mx.array:
    """W x for each row of `x` (..., K) through the 4/8-bit kernels: one row gemv, more rows `q4_rows`."""
    import numpy as np

    rows = x.size // x.shape[-1]
    if rows == 1:
        return q4(x)
    xa = host_vector(x).reshape(rows, q4.K)
    y = np.empty((rows, q4.O), np.float32)
    kernel = kernels().q4_rows if q4.bits == 4 else kernels().q8_rows
    for start in range(0, rows, ROWS_PER_CALL):
        n = min(ROWS_PER_CALL, rows - start)
        kernel(*q4.ptrs, xa[start].ctypes.data, y[start].ctypes.data, q4.O, q4.K, n)
    return mx.array(y).reshape(*x.shape[:-1], q4.O)


def short_q4(m, x: mx.array) -> Q4Weights | None:
    """The layer's 4-bit weights when `x` is short enough for them (see the module docstring), else None."""
    q4 = m.__dict__.get("_q4")
    if q4 is None or x.ndim == 0 or x.shape[-1] != q4.K or x.size // q4.K > SHORT_ROWS:
        return None
    return q4


class CpuLinear:
    """A quantized Linear on the CPU path: 4-bit kernels for up to `SHORT_ROWS` rows, else BLAS on its fp32 copy."""

    def _cpu_prepare(self) -> None:
        prepare(self)

    def __call__(self, x: mx.array) -> mx.array:
        q4 = short_q4(self, x)
        if q4 is not None:
            y = rows_q4(q4, x)
            return y + self["bias"] if "bias" in self else y
        w = fp32_weight(self)
        if "bias" in self:  # what nn.Linear computes on the fp32 weight
            return mx.addmm(self["bias"], x, w.T)
        return x @ w.T


class CpuEmbedding:
    """A quantized Embedding on the CPU path: looks up rows dequantized exactly as the fp32 copy holds them; its
    tied head (`as_linear`) uses the 4/8-bit kernels for up to `SHORT_ROWS` rows, else BLAS on the fp32 copy."""

    def _cpu_prepare(self) -> None:
        prepare(self)

    def __call__(self, ids: mx.array) -> mx.array:
        w = self.__dict__.get("_fp32")
        if w is not None:
            return w[ids]
        f32 = lambda a: a.astype(mx.float32)  # noqa: E731
        return mx.dequantize(self.weight[ids], f32(self.scales[ids]), f32(self.biases[ids]),
                             self.group_size, self.bits).astype(mx.float32)

    def as_linear(self, x: mx.array) -> mx.array:
        q4 = short_q4(self, x)
        if q4 is not None:
            return rows_q4(q4, x)
        return x @ fp32_weight(self).T


def fp32_copies_nbytes(model) -> int:
    """Bytes of the fp32 weight copies built so far in `model` (the model's prefill working set, not any
    conversation's: `python -m app.bench.active_kv` reports it apart)."""
    return sum(m.__dict__["_fp32"].nbytes for _, m in model.named_modules() if m.__dict__.get("_fp32") is not None)
