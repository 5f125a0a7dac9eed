"""`parley bench memory`: tokens prefilled per turn over a long chat with lorebook triggers and one overflow.

One scripted conversation (`turns` user messages, default 200; `--quick` 40)
with a persona whose lorebook has a few entries that the messages mention
now and then, played on Parley's engine (`Session.handle(Generate)`, greedy,
at most `REPLY_TOKENS` tokens a reply). The context window is chosen so the
conversation outgrows it once: the first `PROBE_TURNS` turns run with the
model's window, their tokens per turn project the whole conversation's size
T, and the window is then set to 0.8 T (`--window N` sets it instead). Only
the window the engine checks changes; nothing before that turn depended on it.

Per turn it reports the tokens Parley prefilled (measured: `ReplyStats`, plus
the notes step at the overflow), and what two re-render-at-depth approaches
would have prefilled, computed with the model's tokenizer from the same
transcript (each turn: tokens of its prompt minus the longest common prefix
with the previous prompt plus its reply):

* at depth, same view: the lorebook entries whose keys are in the last
  `scan_depth` messages are inserted as one system message `DEPTH` messages
  from the end (SillyTavern's default depth), re-rendered every turn; the view
  starts where Parley's does (the same sticky drop), no notes.
* at depth, sliding window: the same, with the oldest turns cut every turn
  so the prompt just fits (what a front end does when the window is full).
"""

from __future__ import annotations

import dataclasses
import time

from app.bench import common

TURNS = 200
QUICK_TURNS = 40
PROBE_TURNS = 20
REPLY_TOKENS = 24
DEPTH = 4
LORE = [
    ("Harbour", ["harbour", "harbor"], "The harbour of Vell closes at sunset; smugglers use the north pier."),
    ("Red moon", ["moon"], "In this world the moon is red, and sailors will not sail under a full red moon."),
    ("Grey Gull", ["/grey gull/i", "ship"], "The Grey Gull is a three-masted merchant ship with a crew of twelve."),
    ("Spices", ["spice", "pepper"], "Pepper from the southern isles is worth its weight in silver in Vell."),
    ("Storms", ["storm"], "Autumn storms come from the west and last three days."),
]
SMALL_TALK = ["Good morning, captain.", "How are you today?", "What do we do next?", "Tell me something short.",
              "I see. Go on.", "Why is that?", "What do you think?", "Thanks. Anything else?", "Interesting!",
              "Let us keep going."]
MENTIONS = ["We reach the harbour at dusk.", "Look at the moon tonight.", "Is the Grey Gull ready to sail?",
            "How much pepper do we carry?", "A storm is coming, I think."]


def run(lm, args) -> dict:
    turns = getattr(args, "memory_turns", None) or (QUICK_TURNS if common.quick(args) else TURNS)
    with common.temp_home() as home:
        return measure(lm, home, turns, getattr(args, "window", None), say=lambda m: common.log(args, m))


def script(turns: int) -> list[str]:
    """The user's messages: small talk, with a lorebook mention every seventh turn."""
    return [MENTIONS[(i // 7) % len(MENTIONS)] if i % 7 == 3 else SMALL_TALK[i % len(SMALL_TALK)] for i in range(turns)]


def _persona_file(folder) -> None:
    from app.personas.tomlfile import toml_string

    lines = ['id = "captain-bench"', 'name = "Captain Mara"', 'description = "Captain of the merchant ship Grey Gull."',
             'system_prompt = "You are Captain Mara. Stay in character; answer in one short sentence."',
             'greetings = ["Welcome aboard!"]', "", "[lorebook]", "scan_depth = 4", "token_budget = 200"]
    for i, (name, keys, content) in enumerate(LORE):
        lines += ["", "[[lorebook.entries]]", f"name = {toml_string(name)}",
                  "keys = [" + ", ".join(toml_string(k) for k in keys) + "]", f"content = {toml_string(content)}",
                  f"insertion_order = {10 * (i + 1)}"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "captain-bench.toml").write_text("\n".join(lines) + "\n")


def measure(lm, home, turns: int = TURNS, window: int | None = None, say=print) -> dict:
    from app.catalog import Catalog
    from app.engine import commands as cmd
    from app.engine import events as ev
    from app.engine.session import Session
    from app.kvstore.manager import CacheManager
    from app.personas import load_personas

    folder = home / "bench-personas"
    _persona_file(folder)
    persona = load_personas([folder]).personas["captain-bench"]
    lm = dataclasses.replace(lm, context_window=window or max(lm.context_window, 1 << 20))
    catalog = Catalog(home / "catalog.db")
    manager = CacheManager(common.make_pool(lm, home, "q4", catalog), 1 << 30)
    events: list = []
    session = Session(events.append, lambda: False, lm, catalog, manager, personas_dirs=[folder])
    cid = catalog.create_conversation(persona.id)
    sampling = cmd.Sampling(temperature=0.0, top_p=1.0, max_tokens=REPLY_TOKENS, seed=0)
    rows, starts = [], []
    started = time.perf_counter()
    for i, text in enumerate(script(turns)):
        if i == PROBE_TURNS and window is None:
            lm.context_window = _one_overflow_window(lm, persona, catalog, cid, turns)
            say(f"memory: window set to {lm.context_window} tokens after {PROBE_TURNS} turns (one overflow expected)")
        events.clear()
        session.handle(cmd.Generate(cid, text, sampling))
        done = [e for e in events if isinstance(e, ev.ReplyFinished)]
        if not done:
            raise RuntimeError(f"memory turn {i + 1} failed: {[e for e in events if isinstance(e, ev.EngineFailed)]}")
        notes = [e for e in events if isinstance(e, ev.NotesWritten)]
        lore = [name for e in events if isinstance(e, ev.LoreAdded) for name in e.entries]
        s = done[-1].stats
        rows.append({"turn": i + 1, "prefilled": s.prefilled_tokens + sum(n.prefilled_tokens for n in notes),
                     "reply_prefilled": s.prefilled_tokens, "reused": s.reused_tokens, "generated": s.generated_tokens,
                     "notes_prefilled": sum(n.prefilled_tokens for n in notes),
                     "notes_generated": sum(n.generated_tokens for n in notes),
                     "overflow": any(isinstance(e, ev.ContextTrimmed) for e in events), "lore": lore})
        from app.catalog.caches import context_start

        starts.append(context_start(catalog, cid))
        if (i + 1) % 20 == 0:
            say(f"  turn {i + 1}/{turns}: {time.perf_counter() - started:.1f} s")
    path = catalog.current_path(cid)
    session.close()
    depth = _at_depth(lm, persona, path, starts, sliding=False)
    sliding = _at_depth(lm, persona, path, starts, sliding=True)
    for row, a, b in zip(rows, depth, sliding):
        row["at_depth"], row["at_depth_sliding"] = a, b
    return _summary(rows, lm.context_window, time.perf_counter() - started)


def _one_overflow_window(lm, persona, catalog, cid: int, turns: int) -> int:
    """The preamble, the room kept for notes, and 0.8 of the projected transcript: it overflows once (at ~80%),
    and after the drop to half the window the rest fits."""
    from app.engine.notes import notes_room
    from app.engine.prompt import transcript_messages
    from app.personas import preamble_messages

    ids = lm.tokenizer.encode_chat(transcript_messages(catalog.current_path(cid)), add_generation_prompt=False)
    projected = len(ids) * turns / PROBE_TURNS
    fixed = len(lm.tokenizer.encode_chat(preamble_messages(persona), add_generation_prompt=False)) + notes_room(lm)
    return int(0.8 * projected) + fixed


def _at_depth(lm, persona, path, starts: list[int], sliding: bool) -> list[int]:
    """Tokens a re-render-at-depth front end would prefill each turn, from the same transcript."""
    from app.engine.prompt import common_prefix
    from app.personas import preamble_messages
    from app.personas.lorebook import lorebook_of, triggered_entries

    tok = lm.tokenizer
    book = lorebook_of(persona)
    preamble = preamble_messages(persona)
    messages = [{"role": m.role, "content": m.content} for m in path if m.role in ("user", "assistant")]
    cached: list[int] = []
    out = []
    slide = 0
    for t, start in enumerate(starts):
        upto = messages[: 2 * t + 1]  # this turn's user message is the last
        active = triggered_entries(dataclasses.replace(book, token_budget=1 << 30), [m["content"] for m in upto], len)
        lore = [{"role": "system", "content": "\n\n".join(e.content for e in active)}] if active else []
        if sliding:
            slide = first = _sliding_start(tok, preamble, upto, lore, lm.context_window, slide)
        else:
            first = start
        view = upto[first:]
        cut = max(0, len(view) - DEPTH)
        prompt = preamble + view[:cut] + lore + view[cut:]
        ids = tok.encode_chat(prompt)
        out.append(len(ids) - common_prefix(cached, ids))
        reply = messages[2 * t + 1] if 2 * t + 1 < len(messages) else {"role": "assistant", "content": ""}
        cached = tok.encode_chat(prompt + [reply], add_generation_prompt=False)
    return out


def _sliding_start(tok, preamble, upto, lore, window: int, first: int) -> int:
    """The first user message (from `first` on: the view only moves forward) from which the prompt fits."""
    while first < len(upto) - 1 and len(tok.encode_chat(preamble + lore + upto[first:])) + REPLY_TOKENS > window:
        first += 2
    return first


def _summary(rows: list[dict], window: int, wall: float) -> dict:
    overflow = [r["turn"] for r in rows if r["overflow"]]
    lore_turns = [r["turn"] for r in rows if r["lore"]]

    def stats(key: str) -> dict:
        xs = [r[key] for r in rows]
        return {"total": sum(xs), "median": common.median(xs), "max": max(xs),
                "after_overflow_median": common.median([r[key] for r in rows if overflow and r["turn"] > overflow[0]] or [0]),
                "lore_turns_median": common.median([r[key] for r in rows if r["lore"]] or [0])}

    return {"turns": len(rows), "window": window, "reply_tokens": REPLY_TOKENS, "depth": DEPTH, "wall_s": round(wall, 1),
            "overflow_turns": overflow, "lore_turns": lore_turns,
            "notes_prefilled": sum(r["notes_prefilled"] for r in rows),
            "notes_generated": sum(r["notes_generated"] for r in rows),
            "parley": stats("prefilled"), "at_depth": stats("at_depth"), "at_depth_sliding": stats("at_depth_sliding"),
            "per_turn": [{k: r[k] for k in ("turn", "prefilled", "at_depth", "at_depth_sliding", "lore", "overflow")}
                         for r in rows]}


def report(result: dict) -> str:
    head = ["approach", "total prefilled", "median / turn", "max", "median after overflow", "median on lore turns"]
    rows = [[name, s["total"], s["median"], s["max"], s["after_overflow_median"], s["lore_turns_median"]]
            for name, s in (("parley (measured)", result["parley"]), ("at depth, same view", result["at_depth"]),
                            ("at depth, sliding", result["at_depth_sliding"]))]
    text = common.table(head, rows, f"memory: {result['turns']} turns, window {result['window']}, replies <= "
                                    f"{result['reply_tokens']} tokens, overflow at turn(s) {result['overflow_turns']}, "
                                    f"lore entered on {len(result['lore_turns'])} turns")
    lines = [text, f"notes step at the overflow: {result['notes_prefilled']} tokens prefilled, "
                   f"{result['notes_generated']} written", "per turn (parley / at depth / sliding):"]
    per = result["per_turn"]
    for i in range(0, len(per), 10):
        chunk = per[i:i + 10]
        lines.append(f"  {chunk[0]['turn']:>3}-{chunk[-1]['turn']:<3} " + "  ".join(
            f"{r['prefilled']}/{r['at_depth']}/{r['at_depth_sliding']}{'*' if r['overflow'] else ''}{'+' if r['lore'] else ''}"
            for r in chunk))
    lines.append("  (* overflow turn, + lorebook entries entered)")
    return "\n".join(lines)
