"""Cache state per persona as seen from disk, for processes without a running engine.

`parley personas` and the app's first paint use this; a running engine
overlays "ram" for caches it holds (CacheStatesChanged events).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CacheSummary:
    where: str  # "disk" here; "ram" only ever comes from a live engine
    tokens: int
    bytes: int
    conversation_id: int | None


def cache_states_by_persona(catalog) -> dict[str, CacheSummary]:
    """For each persona with stored conversation caches: all of them added up, chats and scene seats alike
    (the app's persona list counts them the same way); `conversation_id` is the latest one's."""
    rows = catalog.query(
        """
        SELECT k.persona_id AS persona_id, k.tokens AS tokens, k.bytes AS bytes, k.conversation_id AS conversation_id
        FROM caches k JOIN conversations c ON c.id = k.conversation_id
        WHERE k.persona_id IS NOT NULL
        ORDER BY c.updated_at ASC, c.id ASC
        """
    )
    states: dict[str, CacheSummary] = {}
    for row in rows:
        before = states.get(row["persona_id"])
        tokens = int(row["tokens"] or 0) + (before.tokens if before else 0)
        size = int(row["bytes"] or 0) + (before.bytes if before else 0)
        states[row["persona_id"]] = CacheSummary("disk", tokens, size, row["conversation_id"])
    return states


def cache_rows(catalog) -> list[dict]:
    """Every stored cache with its persona and conversation, newest first (for `parley cache ls`)."""
    return catalog.query(
        "SELECT key, persona_id, conversation_id, scheme, tokens, bytes, updated_at, fingerprint "
        "FROM caches ORDER BY updated_at DESC"
    )
