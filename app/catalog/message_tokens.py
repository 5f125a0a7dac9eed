"""Migration m003: the exact token ids the model generated for each reply.

A reply's text does not always re-encode to the tokens that produced it
(byte-level BPE merges differently), so a transcript rendered from text would
differ from the cache after the first changed token and the rest of the turn
would be read again. Keeping the generated ids with the message lets the
prompt splice them back verbatim. Ids are valid for one tokenizer only, so
each row names the model fingerprint it was made with; a different model
ignores them and renders the text.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

import sqlite_utils

from app.catalog.migrations import migration


@migration
def m003_message_tokens(db: sqlite_utils.Database) -> None:
    db.execute(
        """CREATE TABLE message_tokens (
            message_id INTEGER PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
            fingerprint TEXT NOT NULL,
            ids BLOB NOT NULL
        )"""
    )


def pack_ids(ids: Iterable[int]) -> bytes:
    """Token ids as little-endian uint32 (4 bytes a token)."""
    packed = array("I", [int(i) for i in ids])
    if packed.itemsize != 4:  # pragma: no cover - every platform Parley runs on has a 4-byte unsigned int
        raise RuntimeError("array('I') is not 32-bit here")
    return packed.tobytes()


def unpack_ids(blob: bytes) -> list[int]:
    out = array("I")
    out.frombytes(bytes(blob))
    return out.tolist()


def save_token_ids(catalog, message_id: int, fingerprint: str, ids: list[int]) -> None:
    """Remember the ids a reply was generated as (replaces any earlier row of that message)."""
    with catalog.transaction() as tx:
        tx.db.conn.execute(
            "INSERT OR REPLACE INTO message_tokens (message_id, fingerprint, ids) VALUES (?, ?, ?)",
            (int(message_id), fingerprint, pack_ids(ids)),
        )


def token_ids_of(catalog, message_ids: Iterable[int], fingerprint: str) -> dict[int, list[int]]:
    """The stored ids of these messages that were made by the model with this fingerprint."""
    wanted = [int(m) for m in message_ids]
    out: dict[int, list[int]] = {}
    for i in range(0, len(wanted), 500):
        chunk = wanted[i:i + 500]
        marks = ",".join("?" * len(chunk))
        for row in catalog.query(
                f"SELECT message_id, ids FROM message_tokens WHERE fingerprint = ? AND message_id IN ({marks})",
                [fingerprint, *chunk]):
            out[int(row["message_id"])] = unpack_ids(row["ids"])
    return out
