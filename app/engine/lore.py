"""Which lorebook entries a turn adds, and how a stored entry is shown to the model.

The entries a user message triggers are stored in that message's meta
(`meta["lore"]`: id, name and the text as it entered), so every later render
of the conversation is identical: the note sits right after the message that
triggered it, and everything before it stays cached. A regeneration reuses
the stored entries; an edited message is a new message and is matched again.
"""

from __future__ import annotations

from app.catalog.context import context_start


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
