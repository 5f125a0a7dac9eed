"""`parley chat PERSONA MESSAGE`: one turn from the shell, on the same engine and store as the app.

Continues the persona's latest conversation (or `--new`), streams the reply
to stdout, or with `--json` prints exactly one JSON object:
{"reply", "conversation", "ttft_ms", "reused_tokens", "prefilled_tokens",
 "generated_tokens", "decode_tps", "cache", "lore"} (`lore`: names of the
lorebook entries that entered the conversation with this turn). A second run in a new process
resumes from the cache on disk.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys

from app.errors import ParleyError


def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="send one message to a persona and print the reply")
    p.add_argument("persona", help="persona id (see `parley personas`)")
    p.add_argument("message", help="what you say")
    p.add_argument("--new", action="store_true", help="start a new conversation instead of continuing the latest")
    p.add_argument("--json", action="store_true", help="print one JSON object with the reply and its figures")
    add_sampling_options(p)
    p.set_defaults(handler=run)


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=None, help="override the persona's temperature")
    p.add_argument("--max-tokens", type=int, default=None, help="override the persona's reply length limit")
    p.add_argument("--seed", type=int, default=None, help="random seed, for repeatable replies")


def sampling_for(persona, args):
    from app.engine.commands import Sampling

    return Sampling(
        temperature=persona.temperature if args.temperature is None else args.temperature,
        top_p=persona.top_p,
        max_tokens=persona.max_tokens if args.max_tokens is None else args.max_tokens,
        seed=args.seed,
    )


def find_persona(persona_id: str):
    from app.personas import load_personas

    result = load_personas()
    if persona_id not in result.personas:
        known = ", ".join(sorted(result.personas)) or "none"
        raise ParleyError(f"Unknown persona {persona_id!r}. Known personas: {known}.")
    return result.personas[persona_id]


def run(args) -> int:
    from app.catalog import Catalog
    from app.engine import commands as cmd
    from app.engine import events as ev

    if not args.message.strip():
        raise ParleyError("The message is empty: say something.")
    persona = find_persona(args.persona)
    events: queue.Queue = queue.Queue()
    engine = start_engine(args, events.put)
    try:
        with Catalog() as catalog:
            conv = None if args.new else catalog.latest_conversation(persona.id)
            conversation_id = conv.id if conv else None
        if conversation_id is None:
            # created on the engine's side only once the model is up and the message fits
            conversation_id = create_conversation(persona.id)
        engine.submit(cmd.Generate(conversation_id, args.message, sampling_for(persona, args)))
        lore: list[str] = []
        finished = wait_for_reply(events, stream=None if args.json else sys.stdout, lore=lore)
    finally:
        engine.shutdown()
    if isinstance(finished, ev.EngineFailed):
        if args.new and conv is None:
            delete_if_empty(conversation_id)
        raise ParleyError(finished.message)
    if args.json:
        print(json.dumps({**reply_json(finished), "lore": lore}))
    else:
        print()
    return 0


def start_engine(args, on_event):
    from app.engine.worker import Engine

    return Engine(on_event, model=args.model, scheme=args.kv_scheme, budget_mb=args.budget_mb).start()


def create_conversation(persona_id: str) -> int:
    from app.catalog import Catalog

    with Catalog() as catalog:
        return catalog.create_conversation(persona_id)


def delete_if_empty(conversation_id: int) -> None:
    from app.catalog import Catalog

    with Catalog() as catalog:
        if not catalog.current_path(conversation_id):
            catalog.delete_conversation(conversation_id)


def wait_for_reply(events: queue.Queue, stream=None, lore: list[str] | None = None):
    """Drain engine events until the reply finishes or the engine fails; echo text to `stream`.

    Names of lorebook entries that entered with the turn are appended to `lore`.
    """
    from app.engine import events as ev

    while True:
        event = events.get()
        if isinstance(event, ev.ModelLoadProgressed) and stream is not None and event.label != "saved":
            print(f"\rPreparing the model: {event.done}/{event.total}", end="", file=sys.stderr)
        elif isinstance(event, ev.TokensGenerated) and stream is not None:
            stream.write(event.text)
            stream.flush()
        elif isinstance(event, ev.LoreAdded) and lore is not None:
            lore.extend(event.entries)
        elif isinstance(event, ev.CacheDiscarded):
            print(f"parley: note: the stored cache was not usable ({event.reason}); rebuilt from the transcript.", file=sys.stderr)
        elif isinstance(event, ev.NotesWritten):
            print("parley: note: the model wrote notes on the turns leaving its view (see `parley notes`).", file=sys.stderr)
        elif isinstance(event, ev.ContextTrimmed):
            print("parley: note: the conversation outgrew the context window; the oldest turns left the model's view "
                  "(the transcript keeps them).", file=sys.stderr)
        elif isinstance(event, (ev.ReplyFinished, ev.EngineFailed)):
            return event


def reply_json(finished) -> dict:
    s = finished.stats
    return {
        "reply": finished.text,
        "conversation": finished.conversation_id,
        "ttft_ms": round(s.ttft_ms, 2),
        "reused_tokens": s.reused_tokens,
        "prefilled_tokens": s.prefilled_tokens,
        "generated_tokens": s.generated_tokens,
        "decode_tps": round(s.decode_tps, 2),
        "cache": s.cache,
    }
