"""`Catalog`: the one SQLite store for conversations, messages and persona records.

Each thread opens its own `Catalog` (SQLite connections belong to one thread;
a `Catalog` also serialises its own calls with a lock, so sharing one is safe,
just slower). Opening is cheap once the database is migrated: one connection,
a few pragmas, one read of `_migrations`.

Consistency: every multi-row write runs in one `BEGIN IMMEDIATE` transaction
(writers queue on the busy timeout instead of failing half-way), and readers
that need more than one statement read inside one transaction, so WAL gives
them one snapshot: a reader never sees half a turn. Use `transaction()` to
group several calls (a user message and its reply) into one commit.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlite_utils

from app.catalog import health
from app.catalog.migrations import migrate
from app.catalog.records import Conversation, Message, PersonaRecord
from app.errors import ParleyError

BUSY_TIMEOUT_S = 30.0
TITLE_CHARS = 48
ROLES = ("system", "user", "assistant")
KINDS = ("chat", "scene")


class _Leaf:
    """Sentinel: 'the conversation's current leaf' (None already means 'no parent')."""

    def __repr__(self) -> str:
        return "LEAF"


LEAF: Any = _Leaf()


def now() -> str:
    """UTC, microseconds, fixed offset: sorts correctly as text."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def short_title(text: str, limit: int = TITLE_CHARS) -> str:
    """The first user message on one line, cut at a word boundary."""
    line = re.sub(r"\s+", " ", text).strip()
    if len(line) <= limit:
        return line or "Untitled"
    cut = line[: limit - 1]
    if " " in cut[limit // 2 :]:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" ,.;:-") + "…"


class Catalog:
    """The catalog database. `Catalog()` opens `app.paths.catalog_path()` (honours PARLEY_HOME)."""

    def __init__(self, path: str | Path | None = None, check: bool = False) -> None:
        """`check`: run the integrity check even if this process ran it already (an app starting)."""
        if path is None:
            from app.paths import catalog_path

            path = catalog_path()
        self.path = Path(path)
        self._lock = threading.RLock()
        health.create_private(self.path)
        health.check_writable(self.path)
        try:
            conn = sqlite3.connect(
                str(self.path),
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,  # guarded by self._lock
            )
        except sqlite3.Error as exc:
            raise ParleyError(
                f"Cannot open the catalog {self.path}: {exc}. Check the file's permissions or set PARLEY_HOME."
            ) from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
            checked_now = health.check_once(conn, self.path, force=check)  # before any write: a damaged file is left alone
            self._enable_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")
            self.db = sqlite_utils.Database(conn, execute_plugins=False)
            migrate(self.db)
        except ParleyError:
            conn.close()
            raise
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise health.storage_error(exc, self.path) from exc
        health.tighten(self.path)
        if checked_now:
            health.keep_backup(conn, self.path)

    @staticmethod
    def _enable_wal(conn: sqlite3.Connection) -> None:
        """WAL persists in the file; switching needs a moment alone with it, so retry while others open."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator["Catalog"]:
        """Group writes into one commit (nested use joins the outer one). Holds the write lock."""
        with self._lock:
            conn = self.db.conn
            if conn.in_transaction:
                yield self
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield self
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """Several reads that must agree with each other: one read transaction."""
        with self._lock:
            conn = self.db.conn
            if conn.in_transaction:
                yield conn
                return
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[dict]:
        """Rows of one parameterised statement as dicts (for modules that add their own tables)."""
        return self._rows(sql, params)

    def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[dict]:
        with self._lock:
            cursor = self.db.conn.execute(sql, tuple(params))
            keys = [d[0] for d in cursor.description]
            return [dict(zip(keys, row)) for row in cursor.fetchall()]

    # -- conversations -----------------------------------------------------

    def create_conversation(
        self,
        persona_id: str | None,
        kind: str = "chat",
        title: str | None = None,
        members: Iterable[str] | None = None,
    ) -> int:
        """A new, empty conversation. A scene lists its `members` in speaking order (persona_id defaults to the first)."""
        if kind not in KINDS:
            raise ParleyError(f"Conversation kind must be one of {', '.join(KINDS)}, not {kind!r}.")
        members = list(dict.fromkeys(members or ()))
        if kind == "scene" and persona_id is None and members:
            persona_id = members[0]
        if kind == "chat" and not persona_id:
            raise ParleyError("A chat needs a persona id.")
        stamp = now()
        with self.transaction() as tx:
            cursor = tx.db.conn.execute(
                "INSERT INTO conversations (persona_id, kind, title, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                (persona_id, kind, title, stamp, stamp),
            )
            conversation_id = int(cursor.lastrowid)
            tx.db.conn.executemany(
                "INSERT INTO scene_members (conversation_id, persona_id, position) VALUES (?, ?, ?)",
                [(conversation_id, pid, i) for i, pid in enumerate(members)],
            )
        return conversation_id

    def get_conversation(self, conversation_id: int) -> Conversation | None:
        with self._snapshot():
            rows = self._rows("SELECT * FROM conversations WHERE id = ?", (conversation_id,))
            if not rows:
                return None
            return Conversation.from_row(rows[0], tuple(self.scene_members(conversation_id)))

    def _conversation(self, conversation_id: int) -> Conversation:
        conversation = self.get_conversation(conversation_id)
        if conversation is None:
            raise ParleyError(f"Conversation {conversation_id} does not exist. `parley chat --new` starts one.")
        return conversation

    def latest_conversation(self, persona_id: str, kind: str = "chat") -> Conversation | None:
        """The persona's most recently updated conversation of this kind, if any."""
        found = self.list_conversations(persona_id=persona_id, kind=kind, limit=1)
        return found[0] if found else None

    def list_conversations(
        self, persona_id: str | None = None, kind: str | None = None, limit: int | None = None
    ) -> list[Conversation]:
        """Newest (most recently updated) first."""
        where, params = [], []
        if persona_id is not None:
            where.append("persona_id = ?")
            params.append(persona_id)
        if kind is not None:
            where.append("kind = ?")
            params.append(kind)
        sql = "SELECT * FROM conversations"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY updated_at DESC, id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        with self._snapshot():
            rows = self._rows(sql, params)
            scene_ids = [r["id"] for r in rows if r["kind"] == "scene"]
            members: dict[int, list[str]] = {}
            if scene_ids:
                marks = ",".join("?" * len(scene_ids))
                for m in self._rows(
                    f"SELECT conversation_id, persona_id FROM scene_members WHERE conversation_id IN ({marks}) "
                    "ORDER BY conversation_id, position",
                    scene_ids,
                ):
                    members.setdefault(m["conversation_id"], []).append(m["persona_id"])
        return [Conversation.from_row(r, tuple(members.get(r["id"], ()))) for r in rows]

    def rename_conversation(self, conversation_id: int, title: str) -> None:
        title = title.strip()
        if not title:
            raise ParleyError("A conversation title cannot be empty.")
        with self.transaction() as tx:
            cursor = tx.db.conn.execute(
                "UPDATE conversations SET title = ?, updated_at = ? WHERE id = ?", (title, now(), conversation_id)
            )
            if cursor.rowcount == 0:
                raise ParleyError(f"Conversation {conversation_id} does not exist.")

    def delete_conversation(self, conversation_id: int) -> bool:
        """Delete it with its messages and members; False when there was nothing to delete."""
        with self.transaction() as tx:
            cursor = tx.db.conn.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
            return cursor.rowcount > 0

    def scene_members(self, conversation_id: int) -> list[str]:
        return [
            r["persona_id"]
            for r in self._rows(
                "SELECT persona_id FROM scene_members WHERE conversation_id = ? ORDER BY position", (conversation_id,)
            )
        ]

    def set_scene_members(self, conversation_id: int, members: Iterable[str]) -> None:
        """Replace a scene's members (order is speaking order)."""
        members = list(dict.fromkeys(members))
        with self.transaction() as tx:
            self._conversation(conversation_id)
            tx.db.conn.execute("DELETE FROM scene_members WHERE conversation_id = ?", (conversation_id,))
            tx.db.conn.executemany(
                "INSERT INTO scene_members (conversation_id, persona_id, position) VALUES (?, ?, ?)",
                [(conversation_id, pid, i) for i, pid in enumerate(members)],
            )

    # -- messages ----------------------------------------------------------

    def add_message(
        self,
        conversation_id: int,
        role: str,
        content: str,
        parent_id: int | None = LEAF,
        persona_id: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> int:
        """Append a message under `parent_id` (default: the current leaf) and make it the leaf.

        The first user message also names an untitled conversation.
        """
        if role not in ROLES:
            raise ParleyError(f"A message role must be one of {', '.join(ROLES)}, not {role!r}.")
        if not isinstance(content, str):
            raise ParleyError("A message's content must be text.")
        meta_json = json.dumps(meta or {}, ensure_ascii=False)
        stamp = now()
        with self.transaction() as tx:
            conn = tx.db.conn
            row = conn.execute("SELECT leaf_id, title FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
            if row is None:
                raise ParleyError(f"Conversation {conversation_id} does not exist.")
            leaf_id, title = row
            if parent_id is LEAF:
                parent_id = leaf_id
            elif parent_id is not None:
                owner = conn.execute("SELECT conversation_id FROM messages WHERE id = ?", (parent_id,)).fetchone()
                if owner is None or owner[0] != conversation_id:
                    raise ParleyError(f"Message {parent_id} is not part of conversation {conversation_id}.")
            cursor = conn.execute(
                "INSERT INTO messages (conversation_id, parent_id, role, content, persona_id, created_at, meta) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (conversation_id, parent_id, role, content, persona_id, stamp, meta_json),
            )
            message_id = int(cursor.lastrowid)
            if title is None and role == "user" and content.strip():
                title = short_title(content)
            conn.execute(
                "UPDATE conversations SET leaf_id = ?, updated_at = ?, title = ? WHERE id = ?",
                (message_id, stamp, title, conversation_id),
            )
        return message_id

    def update_message_meta(self, message_id: int, meta: dict[str, Any]) -> None:
        """Merge `meta` into a message's meta (figures that arrive after the text, say)."""
        with self.transaction() as tx:
            row = tx.db.conn.execute("SELECT meta FROM messages WHERE id = ?", (message_id,)).fetchone()
            if row is None:
                raise ParleyError(f"Message {message_id} does not exist.")
            try:
                merged = json.loads(row[0] or "{}")
            except ValueError:
                merged = {}
            if not isinstance(merged, dict):
                merged = {}
            merged.update(meta)
            tx.db.conn.execute(
                "UPDATE messages SET meta = ? WHERE id = ?", (json.dumps(merged, ensure_ascii=False), message_id)
            )

    def get_message(self, message_id: int) -> Message | None:
        rows = self._rows("SELECT * FROM messages WHERE id = ?", (message_id,))
        return Message.from_row(rows[0]) if rows else None

    def path_to(self, message_id: int) -> list[Message]:
        """The messages from the root down to `message_id` (empty if it does not exist)."""
        rows = self._rows(
            """WITH RECURSIVE up(id, depth) AS (
                   SELECT id, 0 FROM messages WHERE id = ?
                   UNION ALL
                   SELECT m.parent_id, up.depth + 1 FROM messages m JOIN up ON m.id = up.id
                   WHERE m.parent_id IS NOT NULL
               )
               SELECT messages.* FROM up JOIN messages ON messages.id = up.id ORDER BY up.depth DESC""",
            (message_id,),
        )
        return [Message.from_row(r) for r in rows]

    def current_path(self, conversation_id: int) -> list[Message]:
        """The conversation as it is shown: root to current leaf. One statement, so one snapshot."""
        rows = self._rows(
            """WITH RECURSIVE up(id, depth) AS (
                   SELECT leaf_id, 0 FROM conversations WHERE id = ? AND leaf_id IS NOT NULL
                   UNION ALL
                   SELECT m.parent_id, up.depth + 1 FROM messages m JOIN up ON m.id = up.id
                   WHERE m.parent_id IS NOT NULL
               )
               SELECT messages.* FROM up JOIN messages ON messages.id = up.id ORDER BY up.depth DESC""",
            (conversation_id,),
        )
        return [Message.from_row(r) for r in rows]

    def set_leaf(self, conversation_id: int, message_id: int | None) -> None:
        """Show another branch: `message_id` becomes the current leaf (None: an empty view)."""
        with self.transaction() as tx:
            if message_id is not None:
                owner = tx.db.conn.execute("SELECT conversation_id FROM messages WHERE id = ?", (message_id,)).fetchone()
                if owner is None or owner[0] != conversation_id:
                    raise ParleyError(f"Message {message_id} is not part of conversation {conversation_id}.")
            cursor = tx.db.conn.execute(
                "UPDATE conversations SET leaf_id = ?, updated_at = ? WHERE id = ?", (message_id, now(), conversation_id)
            )
            if cursor.rowcount == 0:
                raise ParleyError(f"Conversation {conversation_id} does not exist.")

    def children(self, message_id: int) -> list[Message]:
        """Direct replies to a message, oldest first."""
        return [
            Message.from_row(r)
            for r in self._rows("SELECT * FROM messages WHERE parent_id = ? ORDER BY id", (message_id,))
        ]

    def alternatives(self, message_id: int) -> list[Message]:
        """The message and its siblings with the same parent and role, oldest first (regenerations, edits)."""
        rows = self._rows(
            """SELECT s.* FROM messages m JOIN messages s
                 ON s.conversation_id = m.conversation_id AND s.parent_id IS m.parent_id AND s.role = m.role
               WHERE m.id = ? ORDER BY s.id""",
            (message_id,),
        )
        return [Message.from_row(r) for r in rows]

    def leaf_after(self, message_id: int) -> int:
        """The deepest message reached from `message_id` by always following the newest child."""
        row = self._rows(
            """WITH RECURSIVE down(id, depth) AS (
                   SELECT ?, 0
                   UNION ALL
                   SELECT (SELECT max(c.id) FROM messages c WHERE c.parent_id = down.id), down.depth + 1
                   FROM down WHERE EXISTS (SELECT 1 FROM messages c WHERE c.parent_id = down.id)
               )
               SELECT id FROM down ORDER BY depth DESC LIMIT 1""",
            (message_id,),
        )
        return int(row[0]["id"])

    def message_count(self, conversation_id: int) -> int:
        return self._rows("SELECT count(*) AS n FROM messages WHERE conversation_id = ?", (conversation_id,))[0]["n"]

    # -- personas ----------------------------------------------------------

    def upsert_persona(self, persona: Any, preamble_hash: str | None = None) -> str | None:
        """Record a persona's id, name, preamble hash and source file; returns the hash recorded before (or None).

        Callers compare the two to drop caches built on an older preamble.
        """
        if preamble_hash is None:
            from app.personas.preamble import preamble_hash as compute

            preamble_hash = compute(persona)
        source = getattr(persona, "source", None)
        with self.transaction() as tx:
            row = tx.db.conn.execute("SELECT preamble_hash FROM personas WHERE id = ?", (persona.id,)).fetchone()
            tx.db.conn.execute(
                """INSERT INTO personas (id, name, preamble_hash, source, updated_at) VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT (id) DO UPDATE SET name = excluded.name, preamble_hash = excluded.preamble_hash,
                       source = excluded.source, updated_at = excluded.updated_at""",
                (persona.id, persona.name, preamble_hash, str(source) if source else None, now()),
            )
        return row[0] if row else None

    def sync_personas(self, personas: Iterable[Any]) -> set[str]:
        """Record every loaded persona in one transaction; returns the ids whose preamble changed since last time.

        New personas are not 'changed'. The caller drops caches of the returned ids.
        """
        changed = set()
        with self.transaction():
            for persona in personas:
                from app.personas.preamble import preamble_hash

                new_hash = preamble_hash(persona)
                old_hash = self.upsert_persona(persona, preamble_hash=new_hash)
                if old_hash is not None and old_hash != new_hash:
                    changed.add(persona.id)
        return changed

    def get_persona_record(self, persona_id: str) -> PersonaRecord | None:
        rows = self._rows("SELECT * FROM personas WHERE id = ?", (persona_id,))
        return PersonaRecord(**rows[0]) if rows else None

    def persona_records(self) -> dict[str, PersonaRecord]:
        return {r["id"]: PersonaRecord(**r) for r in self._rows("SELECT * FROM personas ORDER BY id")}
