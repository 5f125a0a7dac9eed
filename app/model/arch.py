"""What Parley needs to know about a model's architecture, read from its config and modules.

Configs differ between families (mlx-community's gemma3 nests the text model's
settings under `text_config`; qwen2/qwen3 attention has no `head_dim`;
deepseek_v2's keys and values have different widths), so the shape of the KV
cache is read from the attention modules themselves, and the context window
from wherever the config keeps it.
"""

from __future__ import annotations

from app.errors import ParleyError

# Architectures the test matrix (tests/test_architectures.py) checks against mlx-lm's own model.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "gemma3",
                           "deepseek_v2")
DEFAULT_CONTEXT = 4096


def check_architecture(config: dict, source: str) -> str:
    """The config's model_type, or a clear error naming it and the supported ones."""
    arch = config.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ParleyError(
            f"{source}: architecture {arch!r} is not supported. Parley runs: {', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    return arch


def context_window(config: dict, model=None) -> int:
    """max_position_embeddings from the config, its text_config (gemma3) or the model's own defaults."""
    for c in (config, config.get("text_config") or {}):
        if c.get("max_position_embeddings"):
            return int(c["max_position_embeddings"])
    for m in (model, getattr(model, "language_model", None)):
        value = getattr(getattr(m, "args", None), "max_position_embeddings", None)
        if value:
            return int(value)
    return DEFAULT_CONTEXT


def kv_shape(model) -> tuple[int, int, int]:
    """(KV heads, key width, value width) of the model's attention layers, as its cache receives them."""
    attn = model.layers[0].self_attn
    if hasattr(attn, "q_head_dim") and hasattr(attn, "v_head_dim"):  # deepseek_v2 (MLA): full heads cached
        return int(attn.num_heads), int(attn.q_head_dim), int(attn.v_head_dim)
    heads, kv_heads = getattr(attn, "n_heads", None), getattr(attn, "n_kv_heads", None)
    if heads and kv_heads:
        dim = getattr(attn, "head_dim", None)
        if not dim and "q_proj" in attn:
            dim = _out_features(attn.q_proj) // heads
        if dim:
            return int(kv_heads), int(dim), int(dim)
    return _probe_kv_shape(model)


def _out_features(linear) -> int:
    scales = getattr(linear, "scales", None)
    return int((scales if scales is not None else linear.weight).shape[0])


def _probe_kv_shape(model) -> tuple[int, int, int]:
    """Run one token through plain caches and read what the first layer stored."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    caches = [KVCache() for _ in model.layers]
    model(mx.array([[0]]), cache=caches)
    k, v = caches[0].keys, caches[0].values
    return int(k.shape[1]), int(k.shape[3]), int(v.shape[3])


def check_tensor_types(model, source: str) -> None:
    """Refuse quantization modes Parley's CPU path cannot dequantize, naming them."""
    import mlx.nn as nn

    for name, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            mode = getattr(m, "mode", "affine")
            if mode != "affine" or m.bits not in (2, 3, 4, 5, 6, 8):
                raise ParleyError(
                    f"{source}: tensor {name} is quantized as {mode} {m.bits}-bit, which Parley cannot run. "
                    "Supported: unquantized (fp32/fp16/bf16) and mlx affine 2/3/4/5/6/8-bit."
                )


def sliding_windows(model) -> list[int | None]:
    """Per layer, its attention window if it is a sliding-window layer (gemma3's local layers), else None.

    Memoised on the model (its layers do not change)."""
    known = getattr(model, "_parley_windows", None)
    if known is not None:
        return known
    from mlx_lm.models import gemma3_text

    from app.model.cpu_fast import text_body

    window = getattr(text_body(model), "window_size", None)
    windows = [int(window) if window and isinstance(layer.self_attn, gemma3_text.Attention)
               and layer.self_attn.is_sliding else None for layer in model.layers]
    object.__setattr__(model, "_parley_windows", windows)
    return windows
