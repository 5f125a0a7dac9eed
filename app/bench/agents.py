"""`parley bench agents`: the paper's multi-agent case - 10 personas in rotation, RAM for 3 of them.

Ten personas (the shipped ones, topped up with simple generated ones in a
temporary folder) each get a conversation; `rounds` rounds are played, each
persona answering one short user message per round in turn (greedy, seed 0,
at most `REPLY_TOKENS` tokens). Modes, same machine, same run:

* persistence: Parley's engine (`Session.handle(Generate)`, q4 caches) with a
  RAM budget sized for 3 conversations (one active working copy + two idle
  compact caches at the final conversation length, measured on a probe cache):
  with 10 in rotation, a persona's cache is normally back on disk when its
  turn comes, so each turn restores it from disk, then prefills only the new
  message.
* persistence, all in RAM: the same with an unlimited budget (hot caches).
* re-prefill: no cache reuse - every turn prefills the whole prompt (preamble
  + transcript) into a fresh mlx-lm cache with the engine's `prefill`, then
  decodes as many tokens as the persistence run produced. It replays exactly
  the transcripts the persistence run wrote, so both do the same model work
  apart from the cache; it skips the catalog and the saves (no strawman).

Round 1 is cold for every mode (no cache exists yet); the table gives the
total and the total after round 1.
"""

from __future__ import annotations

import time
from pathlib import Path

from app.bench import common

N_PERSONAS = 10
ROUNDS = 4
QUICK_ROUNDS = 2
REPLY_TOKENS = 32
MESSAGES = ("Hello! Who are you?", "Tell me one thing you like, in a sentence.", "Why is that?",
            "Give me a short tip.", "Thanks! Anything else?", "Goodbye for now.")


def run(lm, args) -> dict:
    rounds = getattr(args, "agents_rounds", None) or (QUICK_ROUNDS if common.quick(args) else ROUNDS)
    n = getattr(args, "agents_personas", None) or N_PERSONAS
    with common.temp_home() as home:
        return measure(lm, home, n, rounds, say=lambda m: common.log(args, m))


def _personas(home: Path, n: int) -> tuple[list, list[Path]]:
    from app.personas import load_personas
    from app.personas.loader import shipped_personas_dir

    extra = home / "bench-personas"
    extra.mkdir()
    dirs = [shipped_personas_dir(), extra]
    shipped = sorted(load_personas([shipped_personas_dir()]).personas)
    for i in range(max(0, n - len(shipped))):
        (extra / f"bench-{i}.toml").write_text(
            f'id = "bench-{i}"\nname = "Helper {i}"\ndescription = "A friendly helper, number {i}."\n'
            f'system_prompt = "You are Helper {i}. Keep replies short and kind."\n'
            f'greetings = ["Hi, I am Helper {i}."]\n')
    loaded = load_personas(dirs).personas
    ids = (shipped + sorted(k for k in loaded if k.startswith("bench-")))[:n]
    return [loaded[i] for i in ids], dirs


class _PlainCache:
    """An mlx-lm cache with no reuse at all, in the shape the engine's prefill/decode expect."""

    def __init__(self, model):
        from mlx_lm.models.cache import make_prompt_cache

        self.layers = make_prompt_cache(model)

    def appended(self, ids):
        pass


def _budget(lm, home, personas, rounds: int) -> tuple[int, dict]:
    """RAM for 3 conversations at their final length: one active working copy + two idle compact caches."""
    from app.engine.prompt import build_prompt
    from app.kvstore.manager import CacheManager, CompactCache, Entry
    from app.personas import post_history, preamble_messages

    p = max(personas, key=lambda x: len(lm.tokenizer.encode_chat(preamble_messages(x))))
    transcript = []
    for r in range(rounds):
        transcript += [{"role": "user", "content": MESSAGES[r % len(MESSAGES)]},
                       {"role": "assistant", "content": "word " * REPLY_TOKENS}]
    ids = build_prompt(lm.tokenizer, preamble_messages(p), transcript, lm.context_window, 0,
                       post_history=post_history(p)).ids
    pool = common.make_pool(lm, home / "probe", "q4")
    cache, _ = common.fill(lm, pool, ids)
    m = CacheManager(pool, 0)
    m.entries["a"] = Entry(cache, None, p.id)
    active = m.entry_bytes("a")
    m.entries["i"] = Entry(CompactCache.of(cache), None, p.id)
    idle = m.entry_bytes("i")
    pool.store.catalog.close()
    return active + 2 * idle, {"probe_tokens": len(ids), "active_bytes": active, "idle_bytes": idle}


def _play(lm, home, personas, dirs, rounds: int, budget: int, say) -> dict:
    from app.catalog import Catalog
    from app.engine import commands as cmd
    from app.engine import events as ev
    from app.engine.session import Session
    from app.kvstore.manager import CacheManager

    catalog = Catalog(home / "catalog.db")
    pool = common.make_pool(lm, home, "q4", catalog)
    manager = CacheManager(pool, budget)
    events: list = []
    session = Session(events.append, lambda: False, lm, catalog, manager, personas_dirs=dirs)
    convs = {p.id: catalog.create_conversation(p.id) for p in personas}
    sampling = cmd.Sampling(temperature=0.0, top_p=1.0, max_tokens=REPLY_TOKENS, seed=0)
    turns = []
    peak = 0
    started = time.perf_counter()
    for r in range(rounds):
        for p in personas:
            events.clear()
            t0 = time.perf_counter()
            session.handle(cmd.Generate(convs[p.id], MESSAGES[r % len(MESSAGES)], sampling))
            wall = time.perf_counter() - t0
            done = [e for e in events if isinstance(e, ev.ReplyFinished)]
            if not done:
                raise RuntimeError(f"agents turn failed: {[e for e in events if isinstance(e, ev.EngineFailed)]}")
            s = done[-1].stats
            peak = max(peak, manager.ram_bytes())
            turns.append({"round": r + 1, "persona": p.id, "wall_s": wall, "ttft_ms": s.ttft_ms, "cache": s.cache,
                          "reused": s.reused_tokens, "prefilled": s.prefilled_tokens, "generated": s.generated_tokens})
        say(f"  round {r + 1}/{rounds}: {time.perf_counter() - started:.1f} s so far")
    total = time.perf_counter() - started
    transcripts = {p.id: [{"role": m.role, "content": m.content} for m in catalog.current_path(convs[p.id])]
                   for p in personas}
    session.close()
    return {"total_s": total, "turns": turns, "transcripts": transcripts, "peak_ram_bytes": peak}


def _replay(lm, personas, played: dict, rounds: int) -> dict:
    """Re-prefill every turn: the same prompts, the same reply lengths, no cache reuse."""
    from app.engine.commands import Sampling
    from app.engine.generation import decode, prefill
    from app.engine.prompt import build_prompt
    from app.personas import post_history, preamble_messages

    tok = lm.tokenizer
    by = {p.id: p for p in personas}
    turns = []
    counters = {p.id: 0 for p in personas}
    started = time.perf_counter()
    for t in played["turns"]:
        p = by[t["persona"]]
        k = counters[p.id]
        counters[p.id] += 1
        transcript = played["transcripts"][p.id][: 2 * k + 1]  # up to and including this turn's user message
        t0 = time.perf_counter()
        prompt = build_prompt(tok, preamble_messages(p), transcript, lm.context_window, REPLY_TOKENS,
                              post_history=post_history(p))
        cache = _PlainCache(lm.model)
        logits = None
        for step in prefill(lm.model, cache, prompt.ids):
            logits = step.logits
        first = None
        for _ in decode(lm.model, cache, logits, Sampling(0.0, 1.0, t["generated"], 0), set()):
            first = first or time.perf_counter()
        turns.append({"round": t["round"], "persona": p.id, "wall_s": time.perf_counter() - t0,
                      "ttft_ms": ((first or time.perf_counter()) - t0) * 1000, "prefilled": len(prompt.ids)})
    return {"total_s": time.perf_counter() - started, "turns": turns}


def measure(lm, home, n: int = N_PERSONAS, rounds: int = ROUNDS, say=print) -> dict:
    personas, dirs = _personas(home, n)
    budget, probe = _budget(lm, home, personas, rounds)
    say(f"agents: {len(personas)} personas, {rounds} rounds, RAM budget {budget / 1e6:.1f} MB (3 conversations)")
    common.fill(lm, common.make_pool(lm, home / "warmup", "q4"), common.text_tokens(lm, 256))  # warm-up
    modes = {}
    say("  persistence (budget for 3):")
    (home / "p3").mkdir()
    modes["persistence"] = _play(lm, home / "p3", personas, dirs, rounds, budget, say)
    say("  persistence (all in RAM):")
    (home / "pall").mkdir()
    modes["persistence_all_ram"] = _play(lm, home / "pall", personas, dirs, rounds, 64 << 30, say)
    say("  re-prefill every turn:")
    modes["reprefill"] = _replay(lm, personas, modes["persistence"], rounds)

    def summary(m):
        after = [t for t in m["turns"] if t["round"] > 1]
        s = {"total_s": round(m["total_s"], 2), "after_round1_s": round(sum(t["wall_s"] for t in after), 2),
             "turns": len(m["turns"]),
             "median_ttft_ms_after_round1": round(common.median([t["ttft_ms"] for t in after]), 1) if after else None,
             "prefilled_tokens": sum(t["prefilled"] for t in m["turns"])}
        if "cache" in m["turns"][0]:
            s["cache_sources"] = {k: sum(1 for t in m["turns"] if t["cache"] == k) for k in ("none", "disk", "ram")}
            s["peak_ram_bytes"] = m["peak_ram_bytes"]
        return s

    result = {"personas": [p.id for p in personas], "rounds": rounds, "reply_tokens": REPLY_TOKENS,
              "budget_bytes": budget, "probe": probe, "modes": {k: summary(v) for k, v in modes.items()}}
    base = result["modes"]["reprefill"]
    for k, s in result["modes"].items():
        s["speedup_total"] = round(base["total_s"] / s["total_s"], 2)
        s["speedup_after_round1"] = round(base["after_round1_s"] / s["after_round1_s"], 2) if s["after_round1_s"] else None
    result["per_turn"] = {k: [{kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in t.items()}
                              for t in v["turns"]] for k, v in modes.items()}
    return result


def report(result: dict) -> str:
    head = ["mode", "turns", "total s", "after round 1 s", "median TTFT ms (r>1)", "tokens prefilled",
            "caches none/disk/ram", "speed-up", "speed-up (r>1)"]
    rows = []
    for k, s in result["modes"].items():
        src = s.get("cache_sources")
        rows.append([k.replace("_", " "), s["turns"], s["total_s"], s["after_round1_s"], s["median_ttft_ms_after_round1"],
                     s["prefilled_tokens"], "/".join(str(src[x]) for x in ("none", "disk", "ram")) if src else "-",
                     f"{s['speedup_total']}x", f"{s['speedup_after_round1']}x"])
    return common.table(head, rows, f"agents: {len(result['personas'])} personas x {result['rounds']} rounds, "
                                    f"RAM budget {result['budget_bytes'] / 1e6:.1f} MB")
