"""Which lorebook entries a turn adds, and how a stored entry is shown to the model.

The entries a user message triggers are stored in that message's meta
(`meta["lore"]`: id, name and the text as it entered), so every later render
of the conversation is identical: the note sits right after the message that
triggered it, and everything before it stays cached. A regeneration reuses
the stored entries; an edited message is a new message and is matched again.
"""

from __future__ import annotations

from app.catalog.caches import context_start


def lore_for_message(catalog, tokenizer, persona, conversation_id: int, text: str, speaker: str | None = None) -> list[dict]:
    """Entries of the persona's lorebook that `text` (with the recent visible messages) triggers."""
    from app.personas.lorebook import lorebook_of, triggered_entries
    from app.personas.preamble import fill

    book = lorebook_of(persona)
    if not any(not e.constant for e in book.entries):
        return []
    path = [m for m in catalog.current_path(conversation_id) if m.role in ("user", "assistant", "system")]
    visible = path[context_start(catalog, conversation_id, speaker):]
    present = {item.get("id") for m in visible for item in lore_items(m.meta)}
    recent = [m.content for m in visible] + [text]
    entries = triggered_entries(book, recent, lambda s: len(tokenizer.encode(s)), present)
    return [{"id": e.uid, "name": e.name, "content": fill(e.content.strip(), persona)} for e in entries]


def lore_items(meta: dict) -> list[dict]:
    """The lore entries stored with a message (tolerates hand-edited meta)."""
    items = meta.get("lore") if isinstance(meta, dict) else None
    return [i for i in items if isinstance(i, dict) and isinstance(i.get("content"), str)] if isinstance(items, list) else []


def lore_note(items: list[dict]) -> str:
    """The note the model reads after the message that triggered these entries."""
    return "\n\n".join(i["content"] for i in items if i["content"].strip())


# -- scenes: each speaker's own lorebook -------------------------------------


def add_scene_lore(session, conversation_id: int, seats, names: dict[str, str]) -> None:
    """Before a scene round: each speaker's entries that the room's recent lines trigger.

    They are stored with the newest message (`meta["lore_by"][speaker]`) and shown only in that
    speaker's view, right after it: the end of what that speaker has read, so its cache stays valid.
    """
    from app.engine import events as ev
    from app.engine.scene import scene_view
    from app.personas.lorebook import lorebook_of, triggered_entries
    from app.personas.preamble import fill

    catalog = session.catalog
    path = catalog.current_path(conversation_id)
    if not path:
        return
    last = path[-1]
    for persona, speaker in seats:
        book = lorebook_of(persona)
        if not any(not e.constant for e in book.entries):
            continue
        start = context_start(catalog, conversation_id, speaker)
        visible = [m for m in path if m.role in ("user", "assistant", "system")][start:]
        present = {i.get("id") for m in visible for i in _scene_items(m.meta, speaker)}
        recent = [line["content"] for line in scene_view(path, speaker, names)[start:]]
        entries = triggered_entries(book, recent, lambda s: len(session.lm.tokenizer.encode(s)), present)
        if not entries:
            continue
        items = [{"id": e.uid, "name": e.name, "content": fill(e.content.strip(), persona)} for e in entries]
        meta = (catalog.get_message(last.id) or last).meta
        by = dict(meta.get("lore_by") or {}) if isinstance(meta.get("lore_by"), dict) else {}
        by[speaker] = _scene_items(meta, speaker) + items
        catalog.update_message_meta(last.id, {"lore_by": by})
        session.emit(ev.LoreAdded(conversation_id, last.id, tuple(i["name"] for i in items), speaker))


def _scene_items(meta: dict, speaker: str) -> list[dict]:
    by = meta.get("lore_by") if isinstance(meta, dict) else None
    return lore_items({"lore": by.get(speaker)}) if isinstance(by, dict) else []


def scene_lore_note(meta: dict, speaker: str) -> str:
    return lore_note(_scene_items(meta, speaker))
