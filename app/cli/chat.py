"""`parley chat PERSONA MESSAGE`: one turn from the shell, on the same engine and store as the app.

Continues the persona's latest conversation (or `--new`), streams the reply
to stdout, or with `--json` prints exactly one JSON object:
{"reply", "conversation", "ttft_ms", "queued_ms", "reused_tokens", "prefilled_tokens",
 "generated_tokens", "decode_tps", "cache", "lore"} (`ttft_ms` counts from the send; `queued_ms` of it
went waiting for the model to load, so the turn's own time to first token is their difference) (`lore`: names of the
lorebook entries that entered the conversation with this turn). A second run in a new process
resumes from the cache on disk.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import queue
import sys
from contextlib import contextmanager

from app.errors import ParleyError


def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="send one message to a persona and print the reply")
    p.add_argument("persona", help="persona id (see `parley personas`)")
    p.add_argument("message", help="what you say")
    p.add_argument("--new", action="store_true", help="start a new conversation instead of continuing the latest")
    p.add_argument("--json", action="store_true", help="print one JSON object with the reply and its figures")
    add_sampling_options(p)
    p.set_defaults(handler=run, exit_promptly=True)  # everything is saved and closed when `run` returns


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=temperature_value, default=None, help="override the persona's temperature (0 to 5)")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="override the persona's reply length limit (at least 1)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for repeatable replies")


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return value


def temperature_value(text: str) -> float:
    """argparse type: a finite number from 0 to 5 (nan samples garbage, a negative one is meaningless)."""
    from app.engine.commands import MAX_TEMPERATURE

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and 0.0 <= value <= MAX_TEMPERATURE):
        raise argparse.ArgumentTypeError(f"must be a number from 0 to {MAX_TEMPERATURE:g}, not {text!r}")
    return value


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
    for problem in result.problems:  # a broken or hostile file is skipped, and said so once
        print(f"parley: warning: {problem}", file=sys.stderr)
    if persona_id not in result.personas:
        known = ", ".join(sorted(result.personas)) or "none"
        raise ParleyError(f"Unknown persona {persona_id!r}. Known personas: {known}.")
    return result.personas[persona_id]


def run(args) -> int:
    check_text(args.message)
    if not args.message.strip():
        raise ParleyError("The message is empty: say something.")
    with collector_paused(freeze=getattr(args, "exiting", False)) as resume:
        return run_turn(args, find_persona(args.persona), resume)


def run_turn(args, persona, on_model_loaded) -> int:
    """Start the engine, send the message, print the reply; `on_model_loaded` is called once the model is up."""
    from app.catalog import Catalog
    from app.engine import commands as cmd
    from app.engine import events as ev

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
        finished = wait_for_reply(events, stream=None if args.json else sys.stdout, lore=lore,
                                  on_model_loaded=on_model_loaded)
    finally:
        engine.shutdown(release=not getattr(args, "exiting", False))
    print_late_warnings(events)
    if isinstance(finished, ev.EngineFailed):
        if args.new and conv is None:
            delete_if_empty(conversation_id)
        raise failure(finished, printed=not args.json)
    if args.json:
        print(json.dumps({**reply_json(finished), "lore": lore}))
    else:
        print()
    return 0


def check_text(text: str, what: str = "The message") -> None:
    """Refuse text that is not valid UTF-8 (the shell hands such bytes over as lone surrogates)."""
    from app.errors import BadInput

    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadInput(f"{what} is not valid UTF-8 text (bad byte at character {exc.start + 1}): "
                       "check the terminal's encoding or the file it came from, and send it again.") from None


def failure(finished, printed: bool) -> ParleyError:
    """The error to exit with for an `EngineFailed`; a reply that could not be saved is still shown."""
    error = ParleyError(finished.message)
    error.exit_code = finished.exit_code
    if finished.unsaved_reply is not None:
        if printed:  # streamed above
            print()
            error.args = (f"{finished.message} (The reply is printed above; copy it if you want to keep it.)",)
        else:
            error.args = (f"{finished.message} The reply was:\n{finished.unsaved_reply}",)
    return error


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


@contextmanager
def collector_paused(freeze: bool):
    """Python's cyclic garbage collector off while the engine starts; yields the function that turns it back on
    (called when the model is up, so the turn runs as always), which the block's end calls in any case.

    A start creates a few hundred thousand young objects (imports, the model's modules) and nearly no cyclic
    garbage: ~90 collections, ~20 ms of CPU on the 2-core machines, that free next to nothing. With `freeze`
    (a process that exits after this command) what start-up made is frozen first (`gc.freeze`), so the first
    collection after it does not walk all of it; otherwise (`main` called in a longer-lived process) it is
    left collectable, and that first collection pays for it."""
    was_on = gc.isenabled()
    gc.disable()
    state = {"paused": True}

    def resume() -> None:
        if state["paused"]:
            state["paused"] = False
            if freeze:
                gc.freeze()
            if was_on:
                gc.enable()

    try:
        yield resume
    finally:
        resume()


def wait_for_reply(events: queue.Queue, stream=None, lore: list[str] | None = None, on_model_loaded=None):
    """Drain engine events until the reply finishes or the engine fails; echo text to `stream`.

    Names of lorebook entries that entered with the turn are appended to `lore`; `on_model_loaded` is called
    when the model is up.
    """
    from app.engine import events as ev

    while True:
        event = events.get()
        if isinstance(event, ev.ModelLoaded) and on_model_loaded is not None:
            on_model_loaded()
        if isinstance(event, ev.ModelLoadProgressed) and stream is not None and event.label != "saved":
            print(f"\rPreparing the model: {event.done}/{event.total}", end="", file=sys.stderr)
        elif isinstance(event, ev.TokensGenerated) and stream is not None:
            stream.write(event.text)
            stream.flush()
        elif isinstance(event, ev.LoreAdded) and lore is not None:
            lore.extend(event.entries)
        elif isinstance(event, ev.CacheDiscarded):
            print(f"parley: note: the stored cache was not usable ({event.reason}); rebuilt from the transcript.", file=sys.stderr)
        elif isinstance(event, ev.CacheNotSaved):
            print(f"parley: warning: the reply is saved, but its cache was not ({event.reason}); the next reply "
                  "rebuilds it from the transcript.", file=sys.stderr)
        elif isinstance(event, ev.NotesWritten):
            print("parley: note: the model wrote notes on the turns leaving its view (see `parley notes`).", file=sys.stderr)
        elif isinstance(event, ev.ContextTrimmed):
            print("parley: note: the conversation outgrew the context window; the oldest turns left the model's view "
                  "(the transcript keeps them).", file=sys.stderr)
        elif isinstance(event, (ev.ReplyFinished, ev.EngineFailed)):
            return event


def print_late_warnings(events: queue.Queue) -> None:
    """Warnings that come after the reply (its cache save, the final save at shutdown), once each."""
    from app.engine import events as ev

    said = set()
    while True:
        try:
            event = events.get_nowait()
        except queue.Empty:
            return
        if isinstance(event, ev.CacheNotSaved) and event.reason not in said:
            said.add(event.reason)
            print(f"parley: warning: the reply is saved, but its cache was not ({event.reason}); the next reply "
                  "rebuilds it from the transcript.", file=sys.stderr)


def reply_json(finished) -> dict:
    s = finished.stats
    return {
        "reply": finished.text,
        "conversation": finished.conversation_id,
        "ttft_ms": round(s.ttft_ms, 2),
        "queued_ms": round(s.queued_ms, 2),
        "reused_tokens": s.reused_tokens,
        "prefilled_tokens": s.prefilled_tokens,
        "generated_tokens": s.generated_tokens,
        "decode_tps": round(s.decode_tps, 2),
        "cache": s.cache,
    }
