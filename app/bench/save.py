"""`parley bench save`: what persisting one turn costs at 1K and at 8K context (it must not grow with the context).

A q4 conversation cache of N tokens (the shipped text, engine `prefill`) is
saved once (the first save writes every block: shown for comparison). Then
`turns` turns are played as the session plays them: a short user message is
prefilled, a short reply is decoded greedily (engine `prefill` and `decode`),
and `CacheManager.save` persists the cache, exactly as `Session` does after
every reply. Per turn: bytes written (new sealed blocks + the rewritten tail,
fsync and atomic rename included) and the save's wall time; medians reported.
A turn that completes a 256-token block also writes that block (~1.7 MB for q4
on the embedded model): that is the amortised cost of the block and happens
once per 256 tokens whatever the context length.
"""

from __future__ import annotations

from app.bench import common

CONTEXTS = (1024, 8192)
QUICK_CONTEXTS = (1024, 4096)
MESSAGES = ("What does that word mean?", "Give me one more example, please.", "Who used it first?",
            "Is it still used today?", "Thanks. Summarise it in a sentence.", "And the opposite?",
            "Can you say it more simply?", "Why does that matter?")
REPLY_TOKENS = 24


def run(lm, args) -> dict:
    contexts = getattr(args, "save_contexts", None) or (QUICK_CONTEXTS if common.quick(args) else CONTEXTS)
    turns = max(5, common.repeats(args)) if not getattr(args, "save_turns", None) else args.save_turns
    with common.temp_home() as home:
        return measure(lm, home, contexts, turns, say=lambda m: common.log(args, m))


def measure(lm, home, contexts, turns: int = 5, say=print) -> dict:
    import mlx.core as mx

    from app.catalog.caches import conversation_key
    from app.engine.commands import Sampling
    from app.engine.generation import decode, prefill
    from app.kvstore.manager import CacheManager

    tok = lm.tokenizer
    pool = common.make_pool(lm, home, "q4")
    manager = CacheManager(pool, 64 << 30)
    sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=REPLY_TOKENS, seed=0)
    window = lm.context_window
    rows = []
    for n in contexts:
        n = min(n, window - turns * 64) - 40  # not on a block boundary: an empty tail cannot be saved today
        cache, logits = common.fill(lm, pool, common.text_tokens(lm, n))
        key = conversation_key(n)
        manager.put(key, cache, None, "bench")
        first = manager.save(key)
        reports = []
        for t in range(turns):
            msg = tok.encode(f"\n<|im_start|>user\n{MESSAGES[t % len(MESSAGES)]}<|im_end|>\n<|im_start|>assistant\n")
            for step in prefill(lm.model, cache, msg):
                logits = step.logits
            for token in decode(lm.model, cache, logits, sampling, set()):
                pass
            if cache.n_tokens % 256 == 0:  # one token longer: an empty tail cannot be saved today (blockfile.checksum)
                logits = lm.model(mx.array([[token]]), cache=cache.layers)[:, -1, :]
                mx.eval(logits)
                cache.appended([token])
            manager.mark_dirty(key)
            reports.append((cache.n_tokens, manager.save(key)))
        ms_ = [r.seconds * 1000 for _, r in reports]
        by = [r.bytes_written for _, r in reports]
        tail_only = [r for _, r in reports if r.blocks_written == 0]
        rows.append({
            "context_tokens": n, "turns": turns,
            "first_save_bytes": first.bytes_written, "first_save_ms": round(first.seconds * 1000, 2),
            "turn_bytes_median": int(common.median(by)), "turn_ms_median": round(common.median(ms_), 2),
            "turn_bytes_max": max(by), "turn_ms_max": round(max(ms_), 2),
            "tail_only_turns": len(tail_only),
            "tail_only_ms_median": round(common.median([r.seconds * 1000 for r in tail_only]), 2) if tail_only else None,
            "blocks_written": sum(r.blocks_written for _, r in reports),
            "per_turn": [{"tokens": t, "bytes": r.bytes_written, "blocks": r.blocks_written, "ms": round(r.seconds * 1000, 2)}
                         for t, r in reports],
        })
        manager.forget(key)
        say(f"  save {n} tokens: {rows[-1]['turn_bytes_median']} bytes, {rows[-1]['turn_ms_median']} ms per turn (median)")
    a, b = rows[0], rows[-1]
    return {"scheme": "q4", "reply_tokens": REPLY_TOKENS, "rows": rows,
            "ms_ratio_largest_to_smallest": round(b["turn_ms_median"] / a["turn_ms_median"], 2),
            "bytes_ratio_largest_to_smallest": round(b["turn_bytes_median"] / a["turn_bytes_median"], 2)}


def report(result: dict) -> str:
    head = ["context", "turns", "bytes/turn (median)", "ms/turn (median)", "max bytes", "max ms", "blocks written",
            "first full save bytes", "first full save ms"]
    rows = [[r["context_tokens"], r["turns"], r["turn_bytes_median"], r["turn_ms_median"], r["turn_bytes_max"],
             r["turn_ms_max"], r["blocks_written"], r["first_save_bytes"], r["first_save_ms"]] for r in result["rows"]]
    return common.table(head, rows, "save: cost of persisting one turn (q4)")
