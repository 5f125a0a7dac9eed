"""What the catalog hands out: frozen snapshots of rows, safe to pass between threads."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Message:
    """One node of a conversation's message tree. `persona_id` is the speaker (scenes)."""

    id: int
    conversation_id: int
    parent_id: int | None
    role: str
    content: str
    persona_id: str | None
    created_at: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)

    @classmethod
    def from_row(cls, row: dict) -> "Message":
        try:
            meta = json.loads(row["meta"] or "{}")
        except ValueError:  # a hand-edited database: keep going, drop the bad meta
            meta = {}
        return cls(
            id=row["id"],
            conversation_id=row["conversation_id"],
            parent_id=row["parent_id"],
            role=row["role"],
            content=row["content"],
            persona_id=row["persona_id"],
            created_at=row["created_at"],
            meta=meta if isinstance(meta, dict) else {},
        )


@dataclass(frozen=True)
class Conversation:
    """A chat with one persona, or a scene with several (`members`, in speaking order)."""

    id: int
    persona_id: str | None
    kind: str
    title: str | None
    created_at: str
    updated_at: str
    leaf_id: int | None
    members: tuple[str, ...] = ()

    @classmethod
    def from_row(cls, row: dict, members: tuple[str, ...] = ()) -> "Conversation":
        return cls(
            id=row["id"],
            persona_id=row["persona_id"],
            kind=row["kind"],
            title=row["title"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            leaf_id=row["leaf_id"],
            members=members,
        )


@dataclass(frozen=True)
class PersonaRecord:
    """What the catalog remembers about a persona file: enough to notice a changed preamble."""

    id: str
    name: str
    preamble_hash: str | None
    source: str | None
    updated_at: str
