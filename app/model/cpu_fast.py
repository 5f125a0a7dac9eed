"""Make a model fast on MLX's CPU backend.

Measured on the 2-core x86 machines (OpenBLAS preloaded, see `app.fastblas`):
MLX's CPU quantized matmul ran the 135M model at ~11 tokens/s prefill; the
same weights dequantized to fp32 go through BLAS sgemm at ~230 tokens/s.
Apple silicon never calls this: on Metal the quantized kernels are fast.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten


def _dequantized(m) -> mx.array:
    return mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits).astype(mx.float32)


def speed_up_for_cpu(model: nn.Module) -> None:
    """Replace quantized layers by fp32 ones and cast all weights to fp32, in place."""
    replacements = []
    for name, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            w = _dequantized(module)
            linear = nn.Linear(w.shape[1], w.shape[0], bias="bias" in module)
            linear.weight = w
            if "bias" in module:
                linear.bias = module.bias.astype(mx.float32)
            replacements.append((name, linear))
        elif isinstance(module, nn.QuantizedEmbedding):
            w = _dequantized(module)
            embedding = nn.Embedding(w.shape[0], w.shape[1])
            embedding.weight = w
            replacements.append((name, embedding))
    if replacements:
        model.update_modules(tree_unflatten(replacements))
    model.apply(lambda x: x.astype(mx.float32) if x.dtype in (mx.float16, mx.bfloat16) else x)
    mx.eval(model.parameters())


def prefill_logits(model: nn.Module, tokens: mx.array, cache=None) -> mx.array:
    """Run `tokens` (shape [B, L]) through the model, filling `cache`; return logits for the LAST position only.

    Shape [B, 1, vocab], equal to `model(tokens, cache=cache)[:, -1:]` but without computing the
    vocabulary head (49152 x 576 for SmolLM2) over every prompt position. Use it for prefill chunks;
    decode steps (L == 1) can call the model as usual. Works for mlx-lm models whose `model.model`
    returns hidden states and whose head is `lm_head` or tied embeddings (falls back to the full
    forward otherwise).
    """
    inner = getattr(model, "model", None)
    if inner is None:
        return model(tokens, cache=cache)[:, -1:]
    h = inner(tokens, cache=cache)[:, -1:]
    head = getattr(model, "lm_head", None)
    if head is not None:
        return head(h)
    return inner.embed_tokens.as_linear(h)
