"""Rewrite a model in place for MLX's CPU backend: fp32 copies of weights where BLAS needs them (or lean 4-bit
weights), C-kernel module classes.

See app.model.cpu_fast for why and what it buys. Modules are not wrapped: their classes get a CPU mixin
(`retype`), so parameter names and attributes stay those of mlx-lm.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from app.model.cpu_attention import CpuAttention
from app.model.cpu_blocks import CpuBlock, CpuMLP, LeanLinear
from app.model.cpu_kernels import kernels
from app.model.cpu_linear import CpuEmbedding, CpuLinear
from app.model.decode_step import FusedStepModel
from app.model.host_exec import Q4Weights
from app.model.q4_stacks import stack_lazily, stack_of, stackable


def _is_llama_attention(m) -> bool:
    """Attention whose math is `CpuAttention`'s: q/k/v projections (biases allowed), optional q/k RMSNorm per
    head, the module's own rope, softmax(scale q k^T) v with a causal mask, o_proj. Named classes only: a class
    that merely has the same attributes may add softcaps, other norms or scales (gemma2, deepseek_v2)."""
    return type(m) in _attention_classes()


def _attention_classes() -> tuple:
    from mlx_lm.models import gemma3_text, llama, qwen2, qwen3

    return llama.Attention, qwen2.Attention, qwen3.Attention, gemma3_text.Attention


def _is_llama_block(m) -> bool:
    from mlx_lm.models import llama

    return type(m) is llama.TransformerBlock


def _is_llama_model(m) -> bool:
    from mlx_lm.models import llama

    return type(m) is llama.Model


def _is_swiglu_mlp(m) -> bool:
    """down(silu(gate(x)) * up(x)) with separate gate/up projections (`CpuMLP`'s math)."""
    from mlx_lm.models import llama, qwen2, qwen3

    return type(m) in (llama.MLP, qwen2.MLP, qwen3.MLP)


def speed_up_for_cpu(model: nn.Module) -> None:
    """Rewrite `model` in place for MLX's CPU backend.

    Quantized layers get `cpu_linear`'s classes (4-bit kernels for short inputs, an fp32 copy for BLAS built on
    the first call that needs it; other weights fp32); on llama-family models whose
    attention/MLP match mlx-lm's llama modules, attention and MLP get the
    C-kernel versions above when the kernels compile. Outputs stay equal to the original
    within fp32 rounding (tests/test_cpu_fast.py).
    """
    if lean_on_cpu(model):
        _keep_quantized(model)
        return
    load_for_cpu(model)
    for _, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear) and not isinstance(module, (CpuLinear, LeanLinear)):
            _retype(module, CpuLinear)
        elif isinstance(module, nn.QuantizedEmbedding) and not isinstance(module, CpuEmbedding):
            _retype(module, CpuEmbedding)
    _use_kernels(model, blocks=True)


def load_for_cpu(model: nn.Module) -> None:
    """Evaluate `model`'s parameters as the CPU path keeps them: fp16/bf16 values as fp32, and the projections
    the kernels read together (q/k/v, gate/up) stacked (`app.model.q4_stacks`). On a lazily
    loaded model (`app.model.loader`) this is where the weights file is read; on an evaluated one it converts and
    stacks by copying. A lean model (`lean_on_cpu`) is only evaluated (`_keep_quantized` converts it)."""
    if lean_on_cpu(model):
        mx.eval(model.parameters())
        return
    model.apply(lambda x: x.astype(mx.float32) if x.dtype in (mx.float16, mx.bfloat16) else x)
    if kernels() is not None:
        for parts in _stack_groups(model):
            stack_lazily(parts)
    mx.eval(model.parameters())  # one call: MLX reads the file without holding the GIL (the tokenizer loads beside)


def _stack_groups(model: nn.Module) -> list[list]:
    """The projections `_use_kernels` will read with one gemv (`host_exec.stack_q4`) and that are not stacked yet."""
    groups = []
    for layer in getattr(getattr(model, "model", model), "layers", []):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is not None and _is_llama_attention(attn):
            groups.append([attn.q_proj, attn.k_proj, attn.v_proj])
        if mlp is not None and _is_swiglu_mlp(mlp):
            groups.append([mlp.gate_proj, mlp.up_proj])
    return [parts for parts in groups if all(Q4Weights.usable(p) for p in parts) and stack_of(parts) is None
            and stackable(parts)]


LEAN_MB_DEFAULT = 1024


def lean_on_cpu(model: nn.Module) -> bool:
    """Keep this model's weights quantized in RAM? Yes when their fp32 copies would pass `PARLEY_LEAN_MB`
    (default 1024 MB): a 3B model's fp32 copy is ~13 GB, an 8B one's does not fit 16-24 GB machines. Smaller
    models (the embedded one: 540 MB) keep the fp32 copies, whose decode through BLAS gemv is ~2x faster."""
    import os

    limit = float(os.environ.get("PARLEY_LEAN_MB", LEAN_MB_DEFAULT))
    fp32 = sum(m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits * 4 for _, m in model.named_modules()
               if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)))
    return fp32 > limit * 2**20


def _keep_quantized(model: nn.Module) -> None:
    """The lean CPU rewrite: quantized layers stay quantized (`LeanLinear`), fp16/bf16 values become fp32
    (scales and biases included, so dequantizing is exact in fp32), the C kernels for softmax/SiLU apply."""
    model.apply(lambda x: x.astype(mx.float32) if x.dtype in (mx.float16, mx.bfloat16) else x)
    mx.eval(model.parameters())
    for _, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear) and not isinstance(module, LeanLinear):
            _retype(module, LeanLinear)
    _use_kernels(model, blocks=False)


def _use_kernels(model: nn.Module, blocks: bool) -> None:
    """Give attention and MLP modules whose math is llama's the C-kernel classes (and, with `blocks`, whole
    blocks the host-side one-token step); nothing when the kernels could not be built."""
    if kernels() is None:
        return
    for layer in getattr(getattr(model, "model", model), "layers", []):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is not None and _is_llama_attention(attn) and not isinstance(attn, CpuAttention):
            _retype(attn, CpuAttention)
        if mlp is not None and _is_swiglu_mlp(mlp) and not isinstance(mlp, CpuMLP):
            _retype(mlp, CpuMLP)
        if blocks and _is_llama_block(layer) and not isinstance(layer, CpuBlock):
            _retype(layer, CpuBlock)
    if blocks and _is_llama_model(model):  # after the blocks: the plan reads their prepared weights
        _retype(model, FusedStepModel)


_retyped: dict = {}


def _retype(module: nn.Module, mixin: type) -> None:
    """Give `module` a subclass of its own class with `mixin`'s __call__ in front.

    The module keeps its attributes and parameter names (nothing is wrapped), so weights,
    `named_modules()` and code that reads e.g. `layer.self_attn.n_kv_heads` see no difference.
    """
    cls = type(module)
    key = (cls, mixin)
    if key not in _retyped:
        _retyped[key] = type(f"Cpu{cls.__name__}", (mixin, cls), {})
    module.__class__ = _retyped[key]
    module._cpu_prepare()
