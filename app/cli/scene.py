"""`parley scene`: scenes from the shell, on the same engine and store as the app.

    parley scene new NAME PERSONA...      create a scene (2 to 6 personas); prints its id
    parley scene SCENE MESSAGE            one round: the message, then every member replies
    parley scene SCENE                    one round without a message (the personas go on)

SCENE is a scene id or name (the newest scene of that name). Replies print as
"Name: text" in speaking order (a reply's further lines indented by two spaces); `--json` prints exactly one JSON object:
{"scene": id, "replies": [{"persona", "reply", "ttft_ms", "reused_tokens",
"prefilled_tokens", "generated_tokens", "decode_tps", "cache"}], "batch_tps"}.
`--speakers a,b` picks who replies this round. A later run in a new process
resumes every member's cache from disk.
"""

from __future__ import annotations

import json
import queue
import sys

from app.cli.chat import add_sampling_options, check_text, failure, find_persona, start_engine
from app.errors import ParleyError



def register(subparsers) -> None:
    p = subparsers.add_parser(
        "scene", help="several personas in one room: create a scene, or run one round",
        usage="parley scene new NAME PERSONA... | parley scene SCENE [MESSAGE] [--speakers a,b] [--json]",
        description="`parley scene new NAME PERSONA...` creates a scene of 2 to 6 personas and prints its id. "
                    "`parley scene SCENE MESSAGE` runs one round (SCENE: id or name) and prints each reply. "
                    "Sampling options apply to every speaker of the round; what they leave out comes from the "
                    "first speaker's persona (without any, each persona samples as it is set up).",
    )
    p.add_argument("words", nargs="+", metavar="ARG", help="`new NAME PERSONA...`, or `SCENE [MESSAGE]`")
    p.add_argument("--speakers", default=None, help="comma-separated persona ids to reply this round (default: every member)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_sampling_options(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    if args.words[0] == "new":
        return create(args)
    if len(args.words) > 2:
        raise ParleyError(f"Too many arguments: quote the message (parley scene SCENE \"MESSAGE\"). Got: {args.words[1:]}.")
    message = args.words[1] if len(args.words) > 1 else None
    return play_round(args, args.words[0], message)


# -- parley scene new ---------------------------------------------------------------
def create(args) -> int:
    from app.catalog import Catalog
    from app.engine.scene import create_scene
    from app.personas import load_personas

    if len(args.words) < 2:
        raise ParleyError("Usage: parley scene new NAME PERSONA... (2 to 6 personas).")
    name, members = args.words[1].strip(), args.words[2:]
    if name == "new" or name.isdigit():
        raise ParleyError(f"{name!r} cannot name a scene (it reads as a command or an id); pick another name.")
    known = load_personas().personas
    with Catalog() as catalog:
        scene_id = create_scene(catalog, name, members, known)
    if args.json:
        print(json.dumps({"scene": scene_id, "name": name, "members": members}))
    else:
        print(scene_id)
    return 0


def find_scene(catalog, ref: str):
    """A scene by id, else the newest scene with that name (case-insensitive)."""
    if ref.isdigit():
        conv = catalog.get_conversation(int(ref))
        if conv is not None and conv.kind == "scene":
            return conv
    scenes = catalog.list_conversations(kind="scene")
    for conv in scenes:
        if (conv.title or "").casefold() == ref.casefold():
            return conv
    known = ", ".join(f"{c.id} {c.title!r}" for c in scenes[:10]) or "none yet (parley scene new NAME PERSONA...)"
    raise ParleyError(f"No scene {ref!r}. Scenes: {known}.")


# -- parley scene SCENE MESSAGE ------------------------------------------------------
def play_round(args, ref: str, message: str | None) -> int:
    from app.catalog import Catalog
    from app.engine import commands as cmd
    from app.engine import events as ev

    if message is not None:
        check_text(message)
    if message is not None and not message.strip():
        raise ParleyError("The message is empty: say something (or leave MESSAGE out to let the personas go on).")
    with Catalog() as catalog:
        conv = find_scene(catalog, ref)
    members = list(conv.members)
    speakers = [s.strip() for s in args.speakers.split(",") if s.strip()] if args.speakers else members
    strangers = [s for s in speakers if s not in members]
    if strangers:
        raise ParleyError(f"{', '.join(strangers)} not in scene {conv.id} (members: {', '.join(members)}).")
    personas = {pid: find_persona(pid) for pid in members}
    sampling = None
    if args.temperature is not None or args.max_tokens is not None or args.seed is not None:
        first = personas[speakers[0]]
        sampling = cmd.Sampling(
            temperature=first.temperature if args.temperature is None else args.temperature,
            top_p=first.top_p,
            max_tokens=first.max_tokens if args.max_tokens is None else args.max_tokens,
            seed=args.seed,
        )
    events: queue.Queue = queue.Queue()
    engine = start_engine(args, events.put)
    try:
        engine.submit(cmd.SceneRound(conv.id, message or "", tuple(speakers), sampling))
        replies, final = wait_for_round(events, progress=not args.json)
    finally:
        engine.shutdown()
    if isinstance(final, ev.EngineFailed):
        raise failure(final, printed=False)
    if args.json:
        print(json.dumps(round_json(conv.id, replies, final)))
    else:
        for r in replies:
            name = personas[r.persona_id].name if r.persona_id in personas else r.persona_id
            text = "\n  ".join(line for line in r.text.strip().splitlines())  # continuation lines indented
            print(f"{name}: {text}")
    return 0


def wait_for_round(events: queue.Queue, progress: bool = False):
    """Drain engine events until the round ends or the engine fails: (SceneReplyFinished list, final event)."""
    from app.engine import events as ev

    replies = []
    while True:
        event = events.get()
        if isinstance(event, ev.ModelLoadProgressed) and progress and event.label != "saved":
            print(f"\rPreparing the model: {event.done}/{event.total}", end="", file=sys.stderr)
        elif isinstance(event, ev.CacheDiscarded):
            print(f"parley: note: a stored cache was not usable ({event.reason}); rebuilt from the transcript.", file=sys.stderr)
        elif isinstance(event, ev.CacheNotSaved):
            print(f"parley: warning: a cache was not saved ({event.reason}); it is rebuilt from the transcript.",
                  file=sys.stderr)
        elif isinstance(event, ev.ContextTrimmed):
            print("parley: note: the scene outgrew the context window; the oldest turns left a persona's view "
                  "(the transcript keeps them).", file=sys.stderr)
        elif isinstance(event, ev.SceneReplyFinished):
            replies.append(event)
        elif isinstance(event, (ev.SceneRoundFinished, ev.EngineFailed)):
            return replies, event


def round_json(scene_id: int, replies, final) -> dict:
    return {
        "scene": scene_id,
        "replies": [
            {
                "persona": r.persona_id,
                "reply": r.text,
                "ttft_ms": round(r.stats.ttft_ms, 2),
                "reused_tokens": r.stats.reused_tokens,
                "prefilled_tokens": r.stats.prefilled_tokens,
                "generated_tokens": r.stats.generated_tokens,
                "decode_tps": round(r.stats.decode_tps, 2),
                "cache": r.stats.cache,
            }
            for r in replies
        ],
        "batch_tps": round(final.batch_tps, 2),
    }
