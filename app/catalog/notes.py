"""A conversation's notes: what the model wrote about turns that left its view (see app.engine.notes).

Kept per conversation and scene speaker ('' in a chat), like `context_starts`.
The transcript still holds every turn; the notes are what the model sees of
the dropped ones, right after the preamble.
"""

from __future__ import annotations

from app.catalog.store import now

MAX_NOTES_CHARS = 32 * 1024


def conversation_notes(catalog, conversation_id: int, speaker: str | None = None) -> str:
    rows = catalog.query(
        "SELECT text FROM conversation_notes WHERE conversation_id = ? AND speaker = ?", (conversation_id, speaker or "")
    )
    return rows[0]["text"] if rows else ""


def set_conversation_notes(catalog, conversation_id: int, text: str, speaker: str | None = None) -> None:
    """Replace the notes (empty text removes them)."""
    from app.errors import ParleyError

    if len(text) > MAX_NOTES_CHARS:
        raise ParleyError(f"The notes are {len(text)} characters; at most {MAX_NOTES_CHARS} are kept. Shorten them.")
    with catalog.transaction():
        if not text.strip():
            catalog.db.conn.execute("DELETE FROM conversation_notes WHERE conversation_id = ? AND speaker = ?",
                                    (conversation_id, speaker or ""))
            return
        catalog.db.conn.execute(
            "INSERT INTO conversation_notes (conversation_id, speaker, text, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (conversation_id, speaker) DO UPDATE SET text = excluded.text, updated_at = excluded.updated_at",
            (conversation_id, speaker or "", text.strip(), now()),
        )
