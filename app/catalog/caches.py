"""The catalog's records of the KV caches: the one place that reads or writes `caches`, `cache_blocks` and
`context_starts` (tables of migration m002, `app.catalog.cache_schema`).

The block pool (`app.kvstore.pool`) keeps the files; it is handed a `CacheStore` for their rows, so
kvstore never imports the catalog and no SQL on these tables lives outside this module. Cache keys are
built here too (`conversation_key`, `preamble_key`), and what a persona's or a conversation's cache state
is (`CacheSummary`, `cache_states_by_persona`, `conversation_cache_state`), for the app, `parley personas`
and the engine alike.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, replace
from typing import Iterable

SERVER_PREFIX = "srv:"  # caches of `parley serve` requests (app.engine.completion)


def conversation_key(conversation_id: int, persona_id: str | None = None) -> str:
    """A chat's cache ("conv:<id>"), or one scene member's seat in it ("conv:<id>:<persona>")."""
    return f"conv:{conversation_id}" if persona_id is None else f"conv:{conversation_id}:{persona_id}"


def preamble_key(persona_id: str, preamble_hash: str) -> str:
    """A persona's preamble snapshot: new conversations with it start from there."""
    return f"pre:{persona_id}:{preamble_hash[:16]}"


def is_conversation_key(key: str) -> bool:
    return key.startswith("conv:")


@dataclass(frozen=True)
class CacheRecord:
    """One row of `caches`: a cache's chain of block hashes and its current tail file."""

    key: str
    conversation_id: int | None
    persona_id: str | None
    fingerprint: str
    scheme: str
    tokens: int
    chain_json: str
    tail_file: str
    tail_tokens: int
    bytes: int
    updated_at: float

    @property
    def chain(self) -> list[str]:
        """The block hashes, oldest first. Raises ValueError on a hand-damaged row (the load treats it as a miss)."""
        return json.loads(self.chain_json)

    @classmethod
    def from_row(cls, row: dict) -> "CacheRecord":
        return cls(row["key"], row["conversation_id"], row["persona_id"], row["fingerprint"], row["scheme"],
                   int(row["tokens"]), row["chain"], row["tail_file"], int(row["tail_tokens"]), int(row["bytes"]),
                   float(row["updated_at"]))


@dataclass(frozen=True)
class BlockRecord:
    """One row of `cache_blocks`: a sealed block file, shared by every cache whose chain names it."""

    hash: str
    fingerprint: str
    scheme: str
    tokens: int
    bytes: int
    created_at: float
    last_used_at: float


_CACHE_COLUMNS = ("key", "conversation_id", "persona_id", "fingerprint", "scheme", "tokens", "chain", "tail_file",
                  "tail_tokens", "bytes", "updated_at")
_BLOCK_COLUMNS = ("hash", "fingerprint", "scheme", "tokens", "bytes", "created_at", "last_used_at")


class CacheStore:
    """The cache records of one catalog. Every statement is parameterised; writes are one transaction each.

    `write` raises `sqlite3.IntegrityError` when the conversation was deleted meanwhile and
    `sqlite3.OperationalError` when the database refuses (full disk, locked): the pool decides what that means.
    """

    conversation_key = staticmethod(conversation_key)

    def __init__(self, catalog):
        self.catalog = catalog

    def _execute(self, sql: str, params: Iterable = ()) -> None:
        with self.catalog.transaction():
            self.catalog.db.conn.execute(sql, tuple(params))

    # -- caches ------------------------------------------------------------------
    def record(self, key: str) -> CacheRecord | None:
        rows = self.catalog.query(f"SELECT {', '.join(_CACHE_COLUMNS)} FROM caches WHERE key = ?", [key])
        return CacheRecord.from_row(rows[0]) if rows else None

    def records(self, fingerprint: str | None = None, scheme: str | None = None) -> list[CacheRecord]:
        """Every cache row, or those made with this model and scheme."""
        sql = f"SELECT {', '.join(_CACHE_COLUMNS)} FROM caches"
        if fingerprint is None:
            return [CacheRecord.from_row(r) for r in self.catalog.query(sql)]
        return [CacheRecord.from_row(r) for r in self.catalog.query(f"{sql} WHERE fingerprint = ? AND scheme = ?",
                                                                     [fingerprint, scheme])]

    def write(self, key: str, conversation_id: int | None, persona_id: str | None, fingerprint: str, scheme: str,
              tokens: int, chain: list[str], tail_file: str, tail_tokens: int, size: int,
              new_blocks: Iterable[tuple[str, int, int]] = ()) -> None:
        """Insert the rows of the blocks just written ((hash, tokens, bytes) each) and point the cache's row at
        its chain and tail, in one transaction."""
        stamp = time.time()
        with self.catalog.transaction():
            conn = self.catalog.db.conn
            for block_hash, block_tokens, block_bytes in new_blocks:
                conn.execute(_upsert_sql("cache_blocks", _BLOCK_COLUMNS),
                             (block_hash, fingerprint, scheme, block_tokens, block_bytes, stamp, stamp))
            conn.execute(_upsert_sql("caches", _CACHE_COLUMNS), (key, conversation_id, persona_id, fingerprint, scheme,
                                                                 tokens, json.dumps(list(chain)), tail_file,
                                                                 tail_tokens, size, stamp))

    def delete(self, key: str) -> None:
        self._execute("DELETE FROM caches WHERE key = ?", [key])

    def keys_of_conversation(self, conversation_id: int) -> set[str]:
        return {r["key"] for r in self.catalog.query("SELECT key FROM caches WHERE conversation_id = ?",
                                                     [conversation_id])}

    def keys_of_persona(self, persona_id: str) -> list[str]:
        return [r["key"] for r in self.catalog.query("SELECT key FROM caches WHERE persona_id = ?", [persona_id])]

    def tail_files(self) -> set[str]:
        return {r["tail_file"] for r in self.catalog.query("SELECT tail_file FROM caches")}

    def referenced_blocks(self) -> set[str]:
        """Every block hash some cache's chain names."""
        return {h for r in self.catalog.query("SELECT chain FROM caches") for h in json.loads(r["chain"])}

    def keys_beyond_newest(self, prefix: str, keep: int) -> list[str]:
        """Keys starting with `prefix` other than the `keep` most recently saved ones (bounds server caches)."""
        pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self.catalog.query("SELECT key FROM caches WHERE key LIKE ? ESCAPE '\\' "
                                  "ORDER BY updated_at DESC LIMIT -1 OFFSET ?", [pattern, keep])
        return [r["key"] for r in rows]

    # -- blocks --------------------------------------------------------------------
    def known_blocks(self, hashes: list[str]) -> dict[str, int]:
        """hash -> bytes for those of `hashes` that have a row."""
        if not hashes:
            return {}
        rows = self.catalog.query(f"SELECT hash, bytes FROM cache_blocks WHERE hash IN ({','.join('?' * len(hashes))})",
                                  hashes)
        return {r["hash"]: int(r["bytes"]) for r in rows}

    def blocks(self) -> list[BlockRecord]:
        rows = self.catalog.query(f"SELECT {', '.join(_BLOCK_COLUMNS)} FROM cache_blocks")
        return [BlockRecord(**r) for r in rows]

    def touch_blocks(self, hashes: list[str]) -> None:
        if hashes:
            self._execute(f"UPDATE cache_blocks SET last_used_at = ? WHERE hash IN ({','.join('?' * len(hashes))})",
                          [time.time(), *hashes])

    def delete_block(self, block_hash: str) -> None:
        self._execute("DELETE FROM cache_blocks WHERE hash = ?", [block_hash])

    # -- what the app and `parley personas` show -----------------------------------
    def conversation_rows(self) -> list[dict]:
        """Stored caches of conversations (chats and scene seats), oldest conversation first:
        conversation_id, persona_id, tokens, bytes. [] while the database is locked or has no cache table yet
        (a reader shows no disk state this time; nothing is lost)."""
        try:
            return self.catalog.query(
                "SELECT k.conversation_id AS conversation_id, k.persona_id AS persona_id, k.tokens AS tokens, "
                "k.bytes AS bytes FROM caches k JOIN conversations c ON c.id = k.conversation_id "
                "ORDER BY c.updated_at ASC, c.id ASC")
        except sqlite3.OperationalError:
            return []

    def listing(self) -> list[dict]:
        """Every stored cache with its persona and conversation, newest first (for `parley cache ls`)."""
        return self.catalog.query("SELECT key, persona_id, conversation_id, scheme, tokens, bytes, updated_at, "
                                  "fingerprint FROM caches ORDER BY updated_at DESC")


def _upsert_sql(table: str, columns: tuple[str, ...]) -> str:
    """INSERT OR REPLACE with placeholders (sqlite-utils' upsert would commit our transaction early)."""
    return f"INSERT OR REPLACE INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


# -- where the model's view of a long conversation starts (see app.engine.prompt) -------------------------
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


# -- cache state: one type, one rule ---------------------------------------------------------------------
@dataclass(frozen=True)
class CacheSummary:
    """Where a persona's or a conversation's cache is and how big: "ram" (a running engine reported it),
    "disk" (a catalog record) or "none". `conversation_id`: the latest conversation counted."""

    where: str = "none"
    tokens: int = 0
    bytes: int = 0
    conversation_id: int | None = None

    def plus(self, tokens: int, size: int, conversation_id: int | None) -> "CacheSummary":
        return replace(self, tokens=self.tokens + tokens, bytes=self.bytes + size, conversation_id=conversation_id)


def cache_states_by_persona(disk_rows: Iterable[dict], ram_states: Iterable = ()) -> dict[str, CacheSummary]:
    """Cache state per persona: RAM (the engine's last report) beats disk (the catalog) beats none.

    Sizes add up over the persona's conversations, chats and scene seats alike. A persona with a cache in RAM
    shows RAM only; its stored caches of conversations not in RAM are not added to that. `disk_rows`: as
    `CacheStore.conversation_rows` gives them (oldest conversation first); `ram_states`: objects with
    conversation_id, persona_id, tokens and bytes (app.engine.events.CacheState).
    """
    states: dict[str, CacheSummary] = {}
    in_ram = set()
    for state in ram_states:
        before = states.get(state.persona_id, CacheSummary("ram"))
        states[state.persona_id] = before.plus(int(state.tokens), int(state.bytes), state.conversation_id)
        in_ram.add((state.conversation_id, state.persona_id))
    for row in disk_rows:
        pid = row["persona_id"]
        if pid is None or (row["conversation_id"], pid) in in_ram:
            continue
        before = states.get(pid, CacheSummary("disk"))
        if before.where == "disk":
            states[pid] = before.plus(int(row["tokens"] or 0), int(row["bytes"] or 0), row["conversation_id"])
    return states


def conversation_cache_state(conversation_id: int, disk_rows: Iterable[dict], ram_states: Iterable = (),
                             persona_id: str | None = None) -> CacheSummary:
    """The cache of one conversation (a chat), or of one seat in a scene (`persona_id`): RAM beats disk beats none."""
    for state in ram_states:
        if state.conversation_id == conversation_id and (persona_id is None or state.persona_id == persona_id):
            return CacheSummary("ram", int(state.tokens), int(state.bytes), conversation_id)
    for row in disk_rows:
        if row["conversation_id"] == conversation_id and (persona_id is None or row["persona_id"] == persona_id):
            return CacheSummary("disk", int(row["tokens"] or 0), int(row["bytes"] or 0), conversation_id)
    return CacheSummary()
