"""`parley notes PERSONA [--conversation ID] [--seat PERSONA] [--set TEXT | --edit] [--json]`.

Prints a conversation's notes: what the model wrote about the turns that left
its view (app.engine.notes). `--set` replaces them, `--edit` opens them in
$VISUAL/$EDITOR. The model reads the new text from the next turn on (its view
after the preamble is then read again once). PERSONA picks its latest chat;
`--conversation` any chat or scene; `--seat` a scene speaker's notes.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
from pathlib import Path

from app.errors import ParleyError


def register(subparsers) -> None:
    p = subparsers.add_parser("notes", help="read or edit a conversation's notes on turns that left the model's view")
    p.add_argument("persona", nargs="?", default=None, help="persona id: its latest chat")
    p.add_argument("--conversation", type=int, default=None, help="a conversation id instead (chats and scenes)")
    p.add_argument("--seat", default=None, help="in a scene: whose notes (a member's persona id)")
    p.add_argument("--set", dest="text", default=None, help="replace the notes with this text ('' clears them)")
    p.add_argument("--edit", action="store_true", help="edit the notes in $VISUAL or $EDITOR")
    p.add_argument("--json", action="store_true", help="print {conversation, seat, notes}")
    p.set_defaults(handler=run)


def run(args) -> int:
    from app.catalog import Catalog
    from app.catalog.notes import conversation_notes, set_conversation_notes

    with Catalog() as catalog:
        cid = _conversation_id(catalog, args)
        notes = conversation_notes(catalog, cid, args.seat)
        if args.text is not None or args.edit:
            notes = args.text if args.text is not None else _edit(notes)
            set_conversation_notes(catalog, cid, notes, args.seat)
            notes = conversation_notes(catalog, cid, args.seat)
    if args.json:
        print(json.dumps({"conversation": cid, "seat": args.seat, "notes": notes}))
    else:
        print(notes or "(no notes yet: they are written when the conversation first outgrows the context window)")
    return 0


def _conversation_id(catalog, args) -> int:
    if args.conversation is not None:
        conv = catalog.get_conversation(args.conversation)
        if conv is None:
            raise ParleyError(f"Conversation {args.conversation} does not exist.")
    elif args.persona:
        conv = catalog.latest_conversation(args.persona)
        if conv is None:
            raise ParleyError(f"Persona {args.persona!r} has no chat yet. `parley chat {args.persona} MESSAGE` starts one.")
    else:
        raise ParleyError("Say whose notes: `parley notes PERSONA` or `parley notes --conversation ID`.")
    if args.seat is not None and args.seat not in conv.members:
        raise ParleyError(f"{args.seat!r} is not a member of conversation {conv.id}; members: {', '.join(conv.members) or 'none'}.")
    return conv.id


def _edit(text: str) -> str:
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR")
    if not editor:
        raise ParleyError("Neither VISUAL nor EDITOR is set: set one, or use --set TEXT.")
    fd, name = tempfile.mkstemp(prefix="parley-notes-", suffix=".txt")
    path = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        if subprocess.run([*shlex.split(editor), str(path)]).returncode != 0:
            raise ParleyError(f"The editor ({editor}) failed; the notes were left as they were.")
        return path.read_text(encoding="utf-8")
    finally:
        path.unlink(missing_ok=True)
