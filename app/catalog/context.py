"""Where the model's view of a long conversation starts (see app.engine.prompt)."""

from __future__ import annotations


def context_start(catalog, conversation_id: int, speaker: str | None = None) -> int:
    rows = catalog.query(
        "SELECT start FROM context_starts WHERE conversation_id = ? AND speaker = ?", (conversation_id, speaker or "")
    )
    return rows[0]["start"] if rows else 0


def set_context_start(catalog, conversation_id: int, start: int, speaker: str | None = None) -> None:
    with catalog.transaction():
        catalog.db.conn.execute(
            "INSERT INTO context_starts (conversation_id, speaker, start) VALUES (?, ?, ?) "
            "ON CONFLICT (conversation_id, speaker) DO UPDATE SET start = excluded.start",
            (conversation_id, speaker or "", start),
        )
