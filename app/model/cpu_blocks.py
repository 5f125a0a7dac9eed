"""The MLP, transformer block and linear layers retyped for MLX's CPU backend (see app.model.cpu_rewrite).

`CpuMLP` runs SiLU*up in C; `CpuBlock` runs a llama block's one-token step on host buffers;
`LeanLinear` keeps big models' weights 4-bit in RAM. `CpuLinear`/`CpuEmbedding` live in app.model.cpu_linear.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from app.model.cpu_attention import CpuAttention
from app.model.cpu_kernels import data_pointer, fresh, kernels
from app.model.host_exec import host_vector, rms_host, stack_q4


class CpuMLP:
    """SwiGLU MLP with silu(gate)*up in the C kernel (prefill only; one-token steps stay in MLX)."""

    def _cpu_prepare(self) -> None:
        object.__setattr__(self, "_gate_up", stack_q4([self.gate_proj, self.up_proj]))
        object.__setattr__(self, "_down", stack_q4([self.down_proj]))

    def __call__(self, x: mx.array) -> mx.array:
        m = self
        gate_up, down = self.__dict__.get("_gate_up"), self.__dict__.get("_down")
        if x.size == x.shape[-1] and gate_up is not None and down is not None:
            # decode step: gate/up gemv, SiLU*up and down gemv all on the host buffers
            y = gate_up.numpy(host_vector(x))
            n = y.shape[0] // 2
            kernels().silu_mul(y.ctypes.data, y[n:].ctypes.data, n)
            return mx.array(down.numpy(y[:n])).reshape(x.shape)
        if x.shape[-2] == 1:
            return super().__call__(x)
        g = fresh(m.gate_proj(x))
        u = fresh(m.up_proj(x))
        kernels().silu_mul(data_pointer(g), data_pointer(u), g.size)
        return m.down_proj(g)


class CpuBlock:
    """llama TransformerBlock whose one-token step runs on host (numpy) buffers between the C kernels.

    RMSNorm and the residual adds are computed on the host with MLX's exact arithmetic (sequential
    fp32 sum of squares, times 1/N, + eps, 1/sqrt, x * r * w): bitwise MLX's CPU `rms_norm`
    (tests/test_cpu_fast.py), so a layer needs one MLX eval (rope + cache update) instead of
    four. Anything else goes to the original __call__.
    """

    def _cpu_prepare(self) -> None:
        import numpy as np

        norms = (self.input_layernorm, self.post_attention_layernorm)
        host = None
        if all(type(n) is nn.RMSNorm for n in norms):
            host = tuple((np.ascontiguousarray(np.asarray(n.weight.astype(mx.float32))), float(n.eps)) for n in norms)
        object.__setattr__(self, "_host_norms", host)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        norms = self.__dict__.get("_host_norms")
        attn, mlp = self.self_attn, self.mlp
        if (norms is None or x.size != x.shape[-1] or x.dtype != mx.float32 or cache is None or hasattr(cache, "bits")
                or not isinstance(attn, CpuAttention) or not isinstance(mlp, CpuMLP)
                or (mask is not None and not (isinstance(mask, str) and mask == "causal"))
                or norms[0][0].size != x.size):
            return super().__call__(x, mask, cache)
        gate_up, down = mlp.__dict__.get("_gate_up"), mlp.__dict__.get("_down")
        if gate_up is None or down is None or attn.__dict__.get("_qkv") is None or attn.o_q4() is None:
            return super().__call__(x, mask, cache)
        xa = host_vector(x)
        if attn.__dict__["_qkv"].K != xa.size:
            return super().__call__(x, mask, cache)
        r = attn.decode_host(rms_host(xa, *norms[0]), cache)
        h = xa + r
        y = gate_up.numpy(rms_host(h, *norms[1]))
        n = y.shape[0] // 2
        kernels().silu_mul(y.ctypes.data, y[n:].ctypes.data, n)
        return mx.array((h + down.numpy(y[:n])).reshape(x.shape))


class LeanLinear:
    """A quantized Linear that stays 4-bit in RAM on the CPU path.

    Several rows (prefill): the weight is dequantized to fp32 for this call only and multiplied through BLAS
    sgemm (the same values as the fp32 copy the non-lean path keeps; MLX frees it after the matmul and
    reuses the buffer for the next layer's). One row (decode): MLX's quantized matmul reads the 4-bit weight.
    """

    def _cpu_prepare(self) -> None:
        pass

    def __call__(self, x: mx.array) -> mx.array:
        if x.size == x.shape[-1]:
            return super().__call__(x)
        w = mx.dequantize(self.weight, self.scales, self.get("biases"), self.group_size, self.bits,
                          mode=getattr(self, "mode", "affine"))
        y = x @ w.T
        return y + self.bias if "bias" in self else y
