"""Model-level forward helpers: the text body of a model and last-position logits for prefill."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def text_body(model: nn.Module) -> nn.Module | None:
    """The module that maps token ids to final hidden states (`model.model`; for wrappers such as
    mlx-community's gemma3, the text model's), or None if the model has none."""
    lm = getattr(model, "language_model", None)
    if lm is not None and getattr(model, "model", None) is None:
        model = lm
    return getattr(model, "model", None)


def _plain_head_models() -> tuple:
    """Model classes whose __call__ is exactly head(model.model(x)): lm_head or tied embeddings, nothing after."""
    from mlx_lm.models import gemma3_text, llama, qwen2, qwen3

    return llama.Model, qwen2.Model, qwen3.Model, gemma3_text.Model


def _mlx_lm_class(model: nn.Module) -> type:
    """The model's mlx-lm class, also after the CPU rewrite put a mixin in front of it (cpu_rewrite._retype)."""
    from app.model.decode_step import FusedStepModel

    cls = type(model)
    return cls.__bases__[-1] if isinstance(model, FusedStepModel) else cls


def prefill_logits(model: nn.Module, tokens: mx.array, cache=None) -> mx.array:
    """Run `tokens` (shape [B, L]) through the model, filling `cache`; return logits for the LAST position only.

    Shape [B, 1, vocab], equal to `model(tokens, cache=cache)[:, -1:]` but without computing the
    vocabulary head (49152 x 576 for SmolLM2) over every prompt position. Use it for prefill chunks;
    decode steps (L == 1) can call the model as usual. For models whose head is plain (`_plain_head_models`)
    the head runs on the last hidden state; any other model (final softcaps, wrappers) gets all but the
    last token through its body and the last one through its own __call__, so its own post-processing
    makes the logits.
    """
    from mlx_lm.models import gemma3

    if type(model) is gemma3.Model:  # a pure pass-through to its text model
        model = model.language_model
    inner = getattr(model, "model", None)
    if inner is None:
        return model(tokens, cache=cache)[:, -1:]
    if _mlx_lm_class(model) not in _plain_head_models():
        if tokens.shape[1] > 1:
            inner(tokens[:, :-1], cache=cache)
        return model(tokens[:, -1:], cache=cache)
    h = inner(tokens, cache=cache)[:, -1:]
    head = getattr(model, "lm_head", None)
    if head is not None:
        return head(h)
    return inner.embed_tokens.as_linear(h)
