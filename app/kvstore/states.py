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
    """For each persona with a stored cache of its latest chat: where it is, tokens and bytes."""
    rows = catalog.query(
        """
        SELECT c.persona_id AS persona_id, k.tokens AS tokens, k.bytes AS bytes, c.id AS conversation_id
        FROM conversations c JOIN caches k ON k.key = 'conv:' || c.id
        WHERE c.kind = 'chat'
        ORDER BY c.updated_at ASC, c.id ASC
        """
    )
    states = {}
    for row in rows:  # later conversations overwrite earlier ones: the latest wins
        states[row["persona_id"]] = CacheSummary("disk", row["tokens"], row["bytes"], row["conversation_id"])
    return states


def cache_rows(catalog) -> list[dict]:
    """Every stored cache with its persona and conversation, newest first (for `parley cache ls`)."""
    return catalog.query(
        "SELECT key, persona_id, conversation_id, scheme, tokens, bytes, updated_at, fingerprint "
        "FROM caches ORDER BY updated_at DESC"
    )
