"""`parley bench ttft`: time to first token, cold / warm / hot, at 1K-8K context (the paper's Table 3).

Measured through the engine's own turn logic: `Session.reply` on a conversation
whose transcript is [user: N tokens of the shipped English text, assistant: a
short answer, user: a short question], temperature 0, one token. TTFT is the
session's own `ReplyStats.ttft_ms`: from the start of `reply` (reading the
transcript, rendering and tokenizing the prompt, finding the cache) to the
first sampled token. The conversation's cache holds exactly the rendered
transcript up to the question, made by the engine's `prefill` and saved by
the block pool, as a previous turn would have left it.

* cold: no cache at all (conversation and persona-preamble caches dropped):
  the whole prompt is prefilled by the engine's prefill (`prefill_logits`,
  C softmax/SiLU kernels, 512-token chunks): the fastest prefill Parley has.
* warm: the cache was saved to disk and evicted from RAM; `CacheManager.get`
  reads, verifies and decodes it from the block pool, then the question is
  prefilled. Two flavours: `warm` with the files' pages dropped from the OS
  page cache first (posix_fadvise DONTNEED: read from the disk), and
  `warm_pagecache` with them left in the page cache (a cache evicted moments ago).
* hot: the cache is in RAM in compact form (encoded blocks + tail, as after a
  persona switch); `get` expands it into the working copy, then the question
  is prefilled.

The context column is the number of tokens the model attends to when it
produces the first token (the whole prompt); at "8K" that is the model's
window (8,192) minus the one-token reply reserve and one more token (8,190).
"""

from __future__ import annotations

from app.bench import common

CONTEXTS = (1024, 2048, 4096, 8192)
QUICK_CONTEXTS = (1024, 2048)
QUESTION = "In one sentence, what is this text about?"
ANSWER = "It is about hackers and their slang."
SYSTEM = "You are a helpful assistant. Answer clearly and briefly."


def run(lm, args) -> dict:
    contexts = getattr(args, "ttft_contexts", None) or (QUICK_CONTEXTS if common.quick(args) else CONTEXTS)
    with common.temp_home() as home:
        return measure(lm, home, contexts, common.repeats(args), say=lambda m: common.log(args, m))


def _persona():
    from app.personas.model import Persona

    return Persona(id="bench", name="Assistant", system_prompt=SYSTEM, temperature=0.0, top_p=1.0, max_tokens=1)


def _build_conversation(lm, catalog, persona, target: int):
    """A conversation [X, A, Q] whose rendered prompt has about `target` tokens; (id, question id, prompt, base ids)."""
    from app.engine.prompt import build_prompt, transcript_messages
    from app.personas import preamble_messages

    tok = lm.tokenizer
    pre = preamble_messages(persona)
    window = lm.context_window
    # The window minus the 1-token reply reserve, minus one more so that the cache after the reply
    # (prompt + 1 token) does not end exactly on a 256-token block boundary: `blockfile.checksum`
    # cannot hash an empty tail (see the restore part's notes), so such a save fails today.
    target = min(target, window - 2)

    def render(x_tokens: int):
        x = common.context_text(lm, max(1, x_tokens))
        msgs = [{"role": "user", "content": x}, {"role": "assistant", "content": ANSWER}, {"role": "user", "content": QUESTION}]
        return x, len(tok.encode_chat(pre + msgs))

    k = target - render(1)[1]
    for _ in range(6):  # re-tokenizing decoded text is not exact: converge on the target
        x, n = render(k)
        if n == target:
            break
        k += target - n
    if n > target:
        while n > target:
            k -= 1
            x, n = render(k)
    conv = catalog.create_conversation(persona.id, title=f"ttft {target}")
    catalog.add_message(conv, "user", x)
    catalog.add_message(conv, "assistant", ANSWER)
    q_id = catalog.add_message(conv, "user", QUESTION)
    prompt = build_prompt(tok, pre, transcript_messages(catalog.current_path(conv)), window, reserve=1)
    base = tok.encode_chat(pre + transcript_messages(catalog.current_path(conv))[:-1], add_generation_prompt=False)
    if prompt.ids[: len(base)] != base:  # the template must render the past the same way: else reuse is partial
        from app.engine.prompt import common_prefix

        base = prompt.ids[: common_prefix(prompt.ids, base)]
    return conv, q_id, prompt, base


def measure(lm, home, contexts, repeats: int = 3, say=print) -> dict:
    from app.catalog import Catalog
    from app.engine import commands as cmd
    from app.engine import events as ev
    from app.catalog.caches import conversation_key, preamble_key
    from app.engine.session import Session
    from app.kvstore.manager import CacheManager, CompactCache
    from app.personas import preamble_hash

    catalog = Catalog(home / "catalog.db")
    pool = common.make_pool(lm, home, "q4", catalog)
    manager = CacheManager(pool, 64 << 30)  # no eviction behind our back: each state is set up explicitly
    events: list = []
    session = Session(events.append, lambda: False, lm, catalog, manager, personas_dirs=[])
    persona = _persona()
    catalog.upsert_persona(persona)
    pre_key = preamble_key(persona.id, preamble_hash(persona))
    sampling = cmd.Sampling(temperature=0.0, top_p=1.0, max_tokens=1, seed=0)

    rows = []
    for target in contexts:
        conv, q_id, prompt, base_ids = _build_conversation(lm, catalog, persona, target)
        key = conversation_key(conv)
        # The cache a previous turn would have left: the transcript up to the question, saved to disk.
        base, fill_s = common.timed(common.fill, lm, pool, base_ids)
        base = base[0]
        pool.save(key, base, conv, persona.id)
        snapshot = CompactCache.of(base)
        stored_bytes = sum(p.stat().st_size for p in common.cache_files(pool, key))

        def clear():
            for k in (key, pre_key):
                manager.discard(k)  # unpins it too

        def reset_disk():
            """Put the stored cache back to the base state (a measured turn appended the question and a token)."""
            clear()
            pool.save(key, snapshot.expand(pool.scheme, pool.fingerprint), conv, persona.id)

        def turn(expect: str):
            events.clear()
            catalog.set_leaf(conv, q_id)
            session.reply(session.make_turn(catalog.get_conversation(conv), persona, sampling, q_id))
            done = [e for e in events if isinstance(e, ev.ReplyFinished)]
            failed = [e for e in events if isinstance(e, ev.EngineFailed)]
            if failed or not done:
                raise RuntimeError(f"ttft turn failed: {failed or events[-3:]}")
            stats = done[-1].stats
            if stats.cache != expect:
                raise RuntimeError(f"expected a {expect} cache, the session used {stats.cache}")
            return stats.ttft_ms, done[-1].text, stats

        def cold():
            clear()
            pool.drop(key)
            pool.drop(pre_key)
            return turn("none")

        def warm(drop: bool):
            reset_disk()
            if drop:  # the tail file is new at every save: list the files again
                common.drop_page_cache(common.cache_files(pool, key))
            return turn("disk")

        def hot():
            reset_disk()
            manager.discard(key)
            manager.put(key, snapshot.expand(pool.scheme, pool.fingerprint), conv, persona.id)
            manager.entries[key].dirty = False
            manager.compact(key)  # idle: encoded blocks and tail only, as after switching to another persona
            return turn("ram")

        if target == contexts[0]:
            hot(), warm(False), cold()  # warm-up: first-call allocations, kernel compilation
        results = {"cold": [], "warm": [], "warm_pagecache": [], "hot": []}
        texts = {}
        stats = {}
        for r in range(repeats):
            for name, fn in (("cold", cold), ("warm", lambda: warm(True)),
                             ("warm_pagecache", lambda: warm(False)), ("hot", hot)):
                t, text, st = fn()
                results[name].append(t)
                texts.setdefault(name, text)
                stats[name] = st
            say(f"  ttft {len(prompt.ids)} tokens run {r + 1}/{repeats}: " +
                ", ".join(f"{k} {v[-1]:.1f} ms" for k, v in results.items()))
        med = {k: round(common.median(v), 2) for k, v in results.items()}
        rows.append({
            "target": target, "context_tokens": len(prompt.ids), "cached_tokens": len(base_ids),
            "question_tokens": len(prompt.ids) - len(base_ids),
            "cold_ms": med["cold"], "warm_ms": med["warm"], "warm_pagecache_ms": med["warm_pagecache"], "hot_ms": med["hot"],
            "speedup_warm": round(med["cold"] / med["warm"], 1), "speedup_hot": round(med["cold"] / med["hot"], 1),
            "cold_prefill_tokens_per_s": round(len(prompt.ids) / (med["cold"] / 1000), 1),
            "stored_bytes": stored_bytes,
            "same_first_token": len(set(texts.values())) == 1,
            "first_tokens": texts,
            "runs_ms": {k: [round(x, 2) for x in v] for k, v in results.items()},
            "reused_tokens": {k: s.reused_tokens for k, s in stats.items()},
        })
        clear()
    return {"scheme": "q4", "repeats": repeats, "model": lm.name, "rows": rows}


def report(result: dict) -> str:
    head = ["context", "cold ms", "warm ms", "warm (page cache) ms", "hot ms", "cold/warm", "cold/hot", "same token"]
    rows = [[r["context_tokens"], r["cold_ms"], r["warm_ms"], r["warm_pagecache_ms"], r["hot_ms"],
             f"{r['speedup_warm']}x", f"{r['speedup_hot']}x", "yes" if r["same_first_token"] else "no"]
            for r in result["rows"]]
    return common.table(head, rows, "time to first token (q4 cache; median of %s runs)" % result.get("repeats", "?")
                        if "repeats" in result else "time to first token")
