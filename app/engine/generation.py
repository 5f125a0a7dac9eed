"""Prefill and decode over a `ConversationCache`, as generators (the mlx-lm way).

The engine drives these step by step, so it can report progress, stream
text, and stop between any two steps when the user cancels. Only the engine
thread calls them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from app.engine.commands import Sampling
from app.kvstore import prefill_scratch
from app.kvstore.window import apply_windows
from app.model.arch import sliding_windows
from app.model.cpu_fast import prefill_logits, text_body

PREFILL_CHUNK = 512


@dataclass
class Prefilled:
    done: int
    total: int
    logits: mx.array | None = None  # set on the last step: next-token logits


def prefill(model, cache, ids: list[int], chunk: int = PREFILL_CHUNK) -> Iterator[Prefilled]:
    """Feed `ids` through the model into `cache`, one chunk per step; the last step has the logits."""
    apply_windows(cache, sliding_windows(model))
    total = len(ids)
    done = 0
    held = getattr(cache.layers[0], "offset", 0) if cache.layers else 0
    prefill_scratch.reserve(held + total)  # one shared decoding buffer for the whole prefill
    try:
        while done < total:
            piece = ids[done : done + chunk]
            hidden_logits = _forward(model, piece, cache, last_only=done + len(piece) == total)
            mx.eval(hidden_logits, [layer.keys for layer in cache.layers])
            cache.appended(piece)
            done += len(piece)
            yield Prefilled(done, total, hidden_logits if done == total else None)
    finally:
        prefill_scratch.release()  # the chunks' shared decoding buffer: an idle conversation holds its blocks only


def _forward(model, piece: list[int], cache, last_only: bool) -> mx.array:
    """Run the model; the vocabulary head runs for the last position of the last chunk only."""
    inputs = mx.array([piece])
    if last_only:
        return prefill_logits(model, inputs, cache.layers)[:, -1, :]
    return (text_body(model) or model)(inputs, cache=cache.layers)


def make_token_sampler(sampling: Sampling):
    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    if sampling.temperature <= 0:
        return lambda logits: mx.argmax(logits, axis=-1)
    return make_sampler(temp=sampling.temperature, top_p=sampling.top_p if 0 < sampling.top_p < 1 else 0.0)


def decode(model, cache, logits: mx.array, sampling: Sampling, eos_ids: set[int]) -> Iterator[int]:
    """Yield sampled token ids until end of turn or max_tokens; each yielded token is fed back lazily."""
    apply_windows(cache, sliding_windows(model))
    sample = make_token_sampler(sampling)
    logits = logits.reshape(1, -1)
    for _ in range(sampling.max_tokens):
        token = sample(logits - mx.logsumexp(logits, axis=-1, keepdims=True) if sampling.temperature > 0 else logits)
        token_id = int(token.item())
        if token_id in eos_ids:
            yield token_id
            return
        yield token_id
        logits = model(mx.array([[token_id]]), cache=cache.layers)[:, -1, :]
        cache.appended([token_id])
