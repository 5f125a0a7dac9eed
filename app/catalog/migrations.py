"""The catalog schema, as an append-only list of migrations.

Modelled on simonw/llm: each migration is a function `mNNN_name(db)` that
takes a `sqlite_utils.Database`, and its name is recorded in the
`_migrations` table once it has run. The schema exists only here: never edit a
migration that has shipped, append a new one instead (another module may add
its own with `@migration`, as long as it is imported before the catalog
opens; the simplest is to add it at the end of this file).

`migrate()` runs the pending ones inside a single `BEGIN IMMEDIATE`
transaction, so two threads or processes opening a fresh database at the same
time cannot both apply a migration, and a crash half-way leaves the previous
version intact.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone

import sqlite_utils

Migration = Callable[[sqlite_utils.Database], None]

MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    """Append `fn` to the migration list (decorator). Names must be unique and sort in order."""
    if any(m.__name__ == fn.__name__ for m in MIGRATIONS):
        raise ValueError(f"duplicate migration {fn.__name__}")
    MIGRATIONS.append(fn)
    return fn


def applied(db: sqlite_utils.Database) -> set[str]:
    """Names of the migrations already recorded in this database."""
    if not db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_migrations'"
    ).fetchone():
        return set()
    return {row[0] for row in db.execute("SELECT name FROM _migrations")}


def pending(db: sqlite_utils.Database) -> list[Migration]:
    done = applied(db)
    return [m for m in MIGRATIONS if m.__name__ not in done]


def migrate(db: sqlite_utils.Database, upto: int | None = None) -> list[str]:
    """Apply pending migrations (the first `upto` of the list when given); returns the names applied.

    Cheap when nothing is pending: one read, no write lock.
    """
    wanted = MIGRATIONS if upto is None else MIGRATIONS[:upto]
    if all(m.__name__ in applied(db) for m in wanted):
        return []
    conn = db.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        done = applied(db)  # again, under the write lock: another opener may have won
        names = []
        for fn in wanted:
            if fn.__name__ in done:
                continue
            fn(db)
            conn.execute(
                "INSERT INTO _migrations (name, applied_at) VALUES (?, ?)",
                (fn.__name__, datetime.now(timezone.utc).isoformat()),
            )
            names.append(fn.__name__)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return names


@migration
def m001_initial(db: sqlite_utils.Database) -> None:
    """Personas, conversations, the message tree and scene members.

    Ids use AUTOINCREMENT so a deleted conversation's id is never reused: cache
    files are keyed by conversation id and must never match a newer one.
    """
    for sql in (
        """CREATE TABLE personas (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            preamble_hash TEXT,
            source TEXT,
            updated_at TEXT NOT NULL
        )""",
        """CREATE TABLE conversations (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            persona_id TEXT,
            kind TEXT NOT NULL DEFAULT 'chat' CHECK (kind IN ('chat', 'scene')),
            title TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            leaf_id INTEGER REFERENCES messages(id) ON DELETE SET NULL
        )""",
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            parent_id INTEGER REFERENCES messages(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
            content TEXT NOT NULL,
            persona_id TEXT,
            created_at TEXT NOT NULL,
            meta TEXT NOT NULL DEFAULT '{}'
        )""",
        """CREATE TABLE scene_members (
            conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            persona_id TEXT NOT NULL,
            position INTEGER NOT NULL,
            PRIMARY KEY (conversation_id, persona_id)
        )""",
        "CREATE INDEX idx_conversations_persona ON conversations (persona_id, kind, updated_at)",
        "CREATE INDEX idx_messages_conversation ON messages (conversation_id)",
        "CREATE INDEX idx_messages_parent ON messages (parent_id)",
    ):
        db.execute(sql)

# Migrations defined in other modules of this package, in order. Append only.
from app.catalog import cache_schema  # noqa: E402,F401  (m002_kv_caches)
from app.catalog import message_tokens  # noqa: E402,F401  (m003_message_tokens)


@migration
def m004_conversation_notes(db: sqlite_utils.Database) -> None:
    """Notes the model wrote about turns that left its view (issue 17; per scene speaker too).

    One row per conversation and speaker ('' in a chat); `text` grows with each drop and the user may edit it.
    See app.catalog.notes and app.engine.notes.
    """
    db.execute(
        """CREATE TABLE conversation_notes (
            conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            speaker TEXT NOT NULL DEFAULT '',
            text TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (conversation_id, speaker)
        )"""
    )
