"""Migration m002: the records of on-disk KV caches, and where each conversation's view starts.

`cache_blocks`: one row per sealed 256-token block file (content-addressed).
`caches`: one row per cache (a conversation, a scene member, a persona
preamble): its chain of block hashes and its current tail file. Rows go
with their conversation (ON DELETE CASCADE); the files are disposable and
rebuildable from the transcript.
`context_starts`: the first transcript message the model still sees once a
conversation outgrew the context window (per scene speaker too).
"""

from __future__ import annotations

import sqlite_utils

from app.catalog.migrations import migration


@migration
def m002_kv_caches(db: sqlite_utils.Database) -> None:
    db.execute(
        """CREATE TABLE cache_blocks (
            hash TEXT PRIMARY KEY,
            fingerprint TEXT NOT NULL,
            scheme TEXT NOT NULL,
            tokens INTEGER NOT NULL,
            bytes INTEGER NOT NULL,
            created_at REAL NOT NULL,
            last_used_at REAL NOT NULL
        )"""
    )
    db.execute(
        """CREATE TABLE caches (
            key TEXT PRIMARY KEY,
            conversation_id INTEGER REFERENCES conversations(id) ON DELETE CASCADE,
            persona_id TEXT,
            fingerprint TEXT NOT NULL,
            scheme TEXT NOT NULL,
            tokens INTEGER NOT NULL,
            chain TEXT NOT NULL,
            tail_file TEXT NOT NULL,
            tail_tokens INTEGER NOT NULL,
            bytes INTEGER NOT NULL,
            updated_at REAL NOT NULL
        )"""
    )
    db.execute("CREATE INDEX caches_conversation ON caches(conversation_id)")
    db.execute("CREATE INDEX caches_persona ON caches(persona_id)")
    db.execute(
        """CREATE TABLE context_starts (
            conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            speaker TEXT NOT NULL DEFAULT '',
            start INTEGER NOT NULL,
            PRIMARY KEY (conversation_id, speaker)
        )"""
    )
