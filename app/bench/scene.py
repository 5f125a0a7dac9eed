"""`parley bench scene`: scene speakers decoded in one batch vs one at a time.

Six speakers, each with its own cache holding a different prompt (a slice of
the shipped English text in a ChatML user turn, 300 to 800 tokens: the
speakers sit at different positions, as in a real scene), prefilled by the
engine's own `prefill`. For batch B (2, 4, 6) the first B speakers then
decode `--decode-tokens` (default 64; 24 with --quick) greedy tokens each,
end of turn ignored so every speaker produces the same number of tokens:

* one at a time: each speaker through the engine's chat `decode` (the
  one-persona path: q4 gemv, C softmax), one after the other;
* batched: all B through `app.engine.batch.RaggedDecoder`, one step per token
  for all of them, as a scene round does.

Both start from copies of the same caches; both feed exactly the same tokens
(checked: `same_tokens`). Aggregate tokens/s = all tokens generated / wall
time of the decode steps (the first token comes from the prefill's logits,
so it is not counted). Solo and batched runs alternate; medians over
`--repeats`. The "batch 1" row is the one-at-a-time rate.
"""

from __future__ import annotations

from app.bench import common

BATCHES = (2, 4, 6)
PROMPT_TOKENS = (300, 420, 540, 660, 780, 800)
TARGET_RATIO_AT_4 = 1.5


def run(lm, args) -> dict:
    n = getattr(args, "decode_tokens", None) or 64
    if common.quick(args):
        n = min(n, 24)
    return measure(lm, n, common.repeats(args), say=lambda m: common.log(args, m))


def _speaker_prompts(lm) -> list[list[int]]:
    tok = lm.tokenizer
    ids = common.text_tokens(lm, sum(PROMPT_TOKENS) + 64)
    prompts, at = [], 0
    for n in PROMPT_TOKENS:
        text = tok.decode(ids[at : at + n - 24])
        at += n
        prompts.append(tok.encode_chat([{"role": "user", "content": f"Summarise: {text}"}]))
    return prompts


def measure(lm, n_tokens: int, repeats: int, say=print) -> dict:
    import time

    import mlx.core as mx

    from app.engine.batch import RaggedDecoder
    from app.engine.commands import Sampling
    from app.engine.generation import decode, prefill
    from app.kvstore.conversation_cache import ConversationCache
    from app.kvstore.schemes import get_scheme

    scheme = get_scheme("q4")
    bases = []
    for ids in _speaker_prompts(lm):
        cache = ConversationCache.empty(lm.n_layers, scheme, lm.fingerprint)
        logits = None
        for step in prefill(lm.model, cache, ids):
            logits = step.logits
        bases.append((cache, logits))
    decoder = RaggedDecoder(lm.model)
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=n_tokens)

    def copies(b: int):
        return [(c.copy_prefix(c.n_tokens), lg) for c, lg in bases[:b]]

    def solo(b: int) -> tuple[float, list[list[int]]]:
        total, out = 0.0, []
        for cache, logits in copies(b):
            gen = decode(lm.model, cache, logits, greedy, set())
            tokens = [next(gen)]  # from the prefill's logits
            t0 = time.perf_counter()
            tokens.extend(next(gen) for _ in range(n_tokens - 1))  # n-1 feeds, as batched
            total += time.perf_counter() - t0
            out.append(tokens)
        return total, out

    def batched(b: int) -> tuple[float, list[list[int]]]:
        pairs = copies(b)
        caches = [c for c, _ in pairs]
        tokens = [[int(mx.argmax(lg, axis=-1).item())] for _, lg in pairs]
        t0 = time.perf_counter()
        for _ in range(n_tokens - 1):
            last = [t[-1] for t in tokens]
            logits = decoder.step(caches, last)
            for c, t in zip(caches, last):
                c.appended([t])
            for row, nxt in enumerate(mx.argmax(logits, axis=-1).tolist()):
                tokens[row].append(nxt)
        return time.perf_counter() - t0, tokens

    batched(2)  # warm up kernels and allocations
    rows, same = [], True
    steps = n_tokens - 1
    for b in BATCHES:
        solo_t, batch_t = [], []
        for r in range(repeats):
            ts, solo_tokens = solo(b)
            tb, batch_tokens = batched(b)
            solo_t.append(ts)
            batch_t.append(tb)
            same = same and solo_tokens == batch_tokens
        s_tps = b * steps / common.median(solo_t)
        b_tps = b * steps / common.median(batch_t)
        rows.append({"batch": b, "solo_tps": round(s_tps, 2), "batch_tps": round(b_tps, 2), "ratio": round(b_tps / s_tps, 3)})
        say(f"scene: batch {b}: one at a time {s_tps:.1f} tok/s, batched {b_tps:.1f} tok/s ({b_tps / s_tps:.2f}x)")
    one = sum(r["solo_tps"] for r in rows) / len(rows)
    result = {
        "decode_tokens": n_tokens,
        "repeats": repeats,
        "mode": decoder.mode,
        "prompt_tokens": list(PROMPT_TOKENS),
        "batch1_tps": round(one, 2),
        "same_tokens": same,
        "target_ratio_at_4": TARGET_RATIO_AT_4,
    }
    for r in rows:
        result[f"batch{r['batch']}_solo_tps"] = r["solo_tps"]
        result[f"batch{r['batch']}_tps"] = r["batch_tps"]
        result[f"batch{r['batch']}_ratio"] = r["ratio"]
    result["meets_target"] = result.get("batch4_ratio", 0) >= TARGET_RATIO_AT_4
    return result


def report(result: dict) -> str:
    lines = [
        f"scene: aggregate decode tokens/s, {result['decode_tokens']} greedy tokens per speaker, "
        f"median of {result['repeats']} ({result['mode']} path)",
        f"{'batch':>5}  {'one at a time':>13}  {'batched':>9}  {'ratio':>6}",
        f"{1:>5}  {result['batch1_tps']:>13.1f}  {result['batch1_tps']:>9.1f}  {1.0:>6.2f}",
    ]
    for b in BATCHES:
        if f"batch{b}_tps" in result:
            lines.append(f"{b:>5}  {result[f'batch{b}_solo_tps']:>13.1f}  {result[f'batch{b}_tps']:>9.1f}  "
                         f"{result[f'batch{b}_ratio']:>5.2f}x")
    lines.append(f"same tokens batched and alone: {'yes' if result['same_tokens'] else 'NO'}; "
                 f"target >= {result['target_ratio_at_4']}x at batch 4: {'met' if result['meets_target'] else 'NOT met'}")
    return "\n".join(lines)
