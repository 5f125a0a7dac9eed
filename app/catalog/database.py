"""The catalog's connection as its migrations see it: `conn` and `execute`, nothing more.

This is the part of `sqlite_utils.Database` the catalog used (all its SQL is written out by hand).
Importing sqlite-utils (with click, pluggy, dateutil and its numpy probe) was ~0.1 s of CPU at every
`parley chat` start on the 2-core machines, for a wrapper around `sqlite3.Connection.execute`. A
`sqlite_utils.Database` still works wherever a migration takes a `Database` (same two names).
"""

from __future__ import annotations

import sqlite3
from typing import Any, Iterable


class Database:
    """A `sqlite3.Connection` (`conn`) with `execute(sql, parameters)`, as the migrations call it."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, parameters: Iterable[Any] | dict | None = None) -> sqlite3.Cursor:
        if parameters is None:
            return self.conn.execute(sql)
        return self.conn.execute(sql, parameters)
