"""Prefill and decode speed of a loaded model (`parley bench speed` / `--quick`).

Prefill: a `context`-token prompt (default 1024) fed in `chunk`-token pieces
into a fresh mlx-lm KV cache (`mlx_lm.models.cache.make_prompt_cache`), only
the last position's logits computed (`app.model.cpu_fast.prefill_logits`, as
the engine does); tokens/s = context / wall time, median of `repeats` runs.
Decode: greedy single-token steps after that prompt over the app's own cache,
the one the engine makes (`ConversationCache` of sealing caches in the
`--kv-scheme`, compact where the C kernels read it, filled by the engine's
prefill), fed and sampled as `app.engine.generation.decode` does; so on a
llama model the fused one-token step (`app.model.decode_step`) is what is
timed, and the result says whether it ran (`fused_decode_step`). tokens/s is
1 / the median step time over `decode_tokens` steps (each step evaluated, so
it is the latency a user sees per token).
"""

from __future__ import annotations

import statistics
import time


def _prompt(lm, n: int) -> list[int]:
    text = (
        "Parley keeps many personas in one terminal. Each conversation has its own cache, "
        "and the model answers in turn, remembering what was said before. "
    )
    ids = lm.tokenizer.encode(text * (n // 20 + 2))
    return ids[:n]


def measure(lm, context: int = 1024, chunk: int = 512, repeats: int = 3, decode_tokens: int = 64,
            scheme: str = "q4") -> dict:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from app.model.cpu_fast import prefill_logits
    from app.model.decode_step import fused_step_bound

    model = lm.model
    ids = _prompt(lm, context)
    tokens = mx.array([ids])

    def prefill():
        cache = make_prompt_cache(model)
        logits = None
        for start in range(0, len(ids), chunk):
            logits = prefill_logits(model, tokens[:, start:start + chunk], cache)
            mx.eval(logits, [c.state for c in cache])
        return logits, cache

    prefill()  # warm-up (allocations, compiled kernels)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits, cache = prefill()
        times.append(time.perf_counter() - t0)
    prefill_s = statistics.median(times)

    app_cache, logits = _app_cache(lm, ids, chunk, scheme)
    token_id = int(mx.argmax(logits.reshape(1, -1), axis=-1).item())
    step_times = []
    for i in range(decode_tokens + 2):
        t0 = time.perf_counter()
        out = model(mx.array([[token_id]]), cache=app_cache.layers)[:, -1, :]
        app_cache.appended([token_id])
        token_id = int(mx.argmax(out, axis=-1).item())
        if i >= 2:  # first steps warm up
            step_times.append(time.perf_counter() - t0)
    decode_s = statistics.median(step_times)
    return {
        "context_tokens": len(ids),
        "prefill_chunk": chunk,
        "prefill_tokens_per_s": round(len(ids) / prefill_s, 1),
        "prefill_runs_s": [round(t, 3) for t in times],
        "decode_tokens": decode_tokens,
        "decode_tokens_per_s": round(1.0 / decode_s, 1),
        "decode_cache": f"{scheme} sealing cache, " + ("compact" if all(c.compact for c in app_cache.layers) else "full"),
        "fused_decode_step": fused_step_bound(model, app_cache.layers),
    }


def _app_cache(lm, ids: list[int], chunk: int, scheme: str):
    """The cache the engine decodes over, filled with `ids` by the engine's prefill; and the last logits."""
    from app.engine.generation import prefill
    from app.kvstore.conversation_cache import ConversationCache
    from app.kvstore.schemes import get_scheme

    cache = ConversationCache.empty(lm.n_layers, get_scheme(scheme), lm.fingerprint)
    logits = None
    for step in prefill(lm.model, cache, ids, chunk):
        logits = step.logits if step.logits is not None else logits
    return cache, logits


def run(lm, args) -> dict:
    import mlx.core as mx

    from app import fastblas

    result = {
        "model": lm.name,
        "blas": fastblas.loaded or "bundled (reference)",
        "device": str(mx.default_device()),
    }
    result.update(measure(lm, context=getattr(args, "context", 1024), chunk=getattr(args, "chunk", 512),
                          repeats=getattr(args, "repeats", 3), decode_tokens=getattr(args, "decode_tokens", 64),
                          scheme=getattr(args, "kv_scheme", None) or "q4"))
    return result
