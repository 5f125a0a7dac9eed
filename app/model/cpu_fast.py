"""Make a model fast on MLX's CPU backend (Linux x86/ARM without Metal).

Measured on the 2-core x86 machines (OpenBLAS preloaded, see `app.fastblas`),
SmolLM2-135M, `parley bench --quick`:

* MLX's CPU quantized matmul is compute-bound scalar code: 4-bit weights
  prefill ~11 tokens/s. Dequantized to fp32 they go through BLAS sgemm
  (~230 GFLOP/s) -> ~240 tokens/s. fp16/bf16 have no BLAS path (10x slower)
  and 4/8-bit `quantized_matmul` gemv is 2x slower than fp32 gemv even at
  M=1, so among MLX's own kernels fp32 is the fastest for prefill and decode.
* With fp32 matmuls, ~75% of prefill time went to `exp`: MLX's CPU backend
  evaluates exp/sigmoid one scalar at a time (~28 ns each here, also inside
  `mx.compile`d kernels), i.e. the softmax of SDPA and the SiLU of the MLP.
  `speed_up_for_cpu` therefore swaps the llama-style attention and MLP for
  versions that keep the matmuls in MLX/BLAS and run softmax and SiLU*up in a
  small C kernel (vectorized `expf`; no OpenMP: its spinning threads fought
  OpenBLAS on 2 cores), built when Parley is installed (`cpu_kernels`);
  without them (no compiler at install) they stay pure MLX.
  The kernels work in place on freshly evaluated MLX buffers, so these paths
  evaluate at each attention/MLP (fine on CPU: no GPU queue to keep full).
* Decode (one token) is memory-bound: fp32 gemv streams 540 MB a token
  (~14-18 GB/s here). Decode steps instead use the original 4-bit (layers)
  and 8-bit (tied embedding/head) weights, kept outside the parameter tree,
  through AVX-512 or AVX2 gemv kernels that read 4-8x fewer bytes (q/k/v and
  gate/up fused into one call each; SiLU*up and the down projection stay on
  the host buffer), and the decode attention runs in C over the KV cache
  buffers (no tiny BLAS calls, whose thread wake-ups cost more than the math).
  Each MLX eval costs ~60 us here (worker-thread hand-off), so a llama block's
  decode step (`_CpuBlock`) keeps the residual stream on the host: RMSNorm in
  numpy with MLX's exact arithmetic and o_proj straight from the attention
  buffer leave one eval a layer (rope + the cache's own update), with logits and
  cache contents bitwise those of the per-module path (~42 -> ~54 tokens/s).
  The quantized kernels compute exactly q*scale+bias in fp32, so decode logits
  match MLX's 4-bit reference to ~1e-5; prefill uses the same weights
  dequantized exactly to fp32 (fp32 scales: no fp16 rounding), each layer's copy built on the first
  prefill longer than `cpu_linear.SHORT_ROWS` tokens; shorter ones use the row-batched 4-bit kernel
  (`app.model.cpu_linear`), so a start that only resumes a conversation builds no fp32 copy.
* Modules are not wrapped: their classes get a CPU mixin (`cpu_rewrite`), so
  parameter names and attributes stay those of mlx-lm.

Where things are: the C sources in app/csrc; `cpu_kernels` loads them; `host_exec` runs them on host
buffers (4/8-bit gemv, decode attention, RMSNorm); `cpu_attention` and `cpu_blocks` are the module
classes; `cpu_rewrite` rewrites a model (`speed_up_for_cpu`); `forward` has `prefill_logits`; `decode_step` runs a
llama model's whole one-token step over a compact cache in one C call (app/csrc/decode_step.c). This
module is the facade the rest of the app imports.

Without the C kernels everything stays pure MLX (fp32 weights); with only
their portable variant (no AVX2) the quantized decode kernels are off (fp32
gemv instead). Apple silicon never calls this: on Metal the quantized kernels
are fast. `PARLEY_KERNELS=off` turns the C kernels off, `=avx2` etc. picks a variant.
"""

from __future__ import annotations

from app.model.cpu_attention import CpuAttention
from app.model.cpu_blocks import CpuBlock, CpuMLP, LeanLinear
from app.model.cpu_kernels import data_pointer, fresh, kernels
from app.model.cpu_linear import CpuEmbedding, CpuLinear
from app.model.cpu_rewrite import LEAN_MB_DEFAULT, lean_on_cpu, speed_up_for_cpu
from app.model.forward import prefill_logits, text_body
from app.model.host_exec import Q4Weights, attn_decode, attn_decode_host, host_vector, rms_host

__all__ = [
    "LEAN_MB_DEFAULT", "CpuAttention", "CpuBlock", "CpuEmbedding", "CpuLinear", "CpuMLP", "LeanLinear", "Q4Weights",
    "attn_decode", "attn_decode_host", "data_pointer", "fresh", "host_vector", "kernels", "lean_on_cpu",
    "prefill_logits", "rms_host", "speed_up_for_cpu", "text_body",
]
