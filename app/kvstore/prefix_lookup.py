"""Find the stored cache that shares the longest token prefix with a prompt, in RAM or on disk.

Reuse by content, not by slot: `parley serve` gets whole prompts from
front-ends that know nothing of Parley's caches, so every request asks "which
cache, of any conversation, persona preamble or earlier request, already holds
the most of these exact tokens?".

Sealed blocks are content-addressed by a hash chain over (model fingerprint,
scheme, tokens), so for a cache on disk the number of leading blocks it shares
with the prompt is a comparison of hashes, without reading a block. Only when
every block of a stored cache matches does its unsealed tail matter; its token
ids are read from the tail file's header alone (a few KB), remembered by file
name (tail files are never rewritten: a save writes a new one).

Reuse is exact token ids under this model's fingerprint and scheme, so nothing
of another conversation can leak into a reply: a shared prefix is the same
tokens, hence the same keys and values.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from app.kvstore.blockfile import chain_next, chain_root
from app.kvstore.live_cache import BLOCK_TOKENS

HEADER_LIMIT = 64 * 1024 * 1024  # a tail header holds at most 256 token ids; anything larger is not ours


@dataclass(frozen=True)
class PrefixMatch:
    key: str
    tokens: int  # how many leading prompt tokens the cache holds
    in_ram: bool


def common_prefix(a, b) -> int:
    """Length of the common prefix of two lists; whole 256-item slices compared at C speed first."""
    n = min(len(a), len(b))
    i = 0
    while i + BLOCK_TOKENS <= n and a[i : i + BLOCK_TOKENS] == b[i : i + BLOCK_TOKENS]:
        i += BLOCK_TOKENS
    while i < n and a[i] == b[i]:
        i += 1
    return i


def prompt_chain(fingerprint: str, scheme_id: str, ids: list[int]) -> list[str]:
    """Chain hashes of the prompt's whole 256-token blocks (the addresses its blocks would have)."""
    parent = chain_root(fingerprint, scheme_id)
    hashes = []
    for start in range(0, len(ids) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        parent = chain_next(parent, ids[start : start + BLOCK_TOKENS])
        hashes.append(parent)
    return hashes


def tail_tokens_of(path: Path) -> list[int] | None:
    """The token ids recorded in a tail file's header, or None if it cannot be read (a miss)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                return None
            (n,) = struct.unpack("<Q", raw)
            if not 0 < n <= HEADER_LIMIT:
                return None
            header = json.loads(f.read(n))
        tokens = json.loads(header["__metadata__"]["tokens"])
        return tokens if isinstance(tokens, list) and all(isinstance(t, int) for t in tokens) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


class PrefixLookup:
    """Longest stored prefix over the cache manager's RAM entries and the pool's catalog rows."""

    def __init__(self, manager):
        self.manager = manager
        self._tails: dict[str, list[int] | None] = {}  # tail file name -> its token ids
        self._skip: dict[str, str] = {}  # key -> tail file it could not be restored with

    def best(self, ids: list[int], prefer: str | None = None) -> PrefixMatch | None:
        """The cache holding the most leading tokens of `ids` (ties: `prefer`, then RAM); None if none holds any."""
        candidates = self._in_ram(ids) + self._on_disk(ids)
        candidates = [c for c in candidates if c.tokens > 0]
        if not candidates:
            return None
        return max(candidates, key=lambda c: (c.tokens, c.key == prefer, c.in_ram))

    def _in_ram(self, ids: list[int]) -> list[PrefixMatch]:
        return [PrefixMatch(key, common_prefix(entry.cache.tokens, ids), True)
                for key, entry in self.manager.entries.items()]

    def _on_disk(self, ids: list[int]) -> list[PrefixMatch]:
        pool = self.manager.pool
        wanted = prompt_chain(pool.fingerprint, pool.scheme_id, ids)
        matches = []
        for row in pool.store.records(pool.fingerprint, pool.scheme_id):
            if row.key in self.manager.entries or self._skip.get(row.key) == row.tail_file:
                continue
            chain = row.chain
            blocks = common_prefix(chain, wanted)
            n = blocks * BLOCK_TOKENS
            if blocks == len(chain):
                tail = self._tail(row.tail_file)
                if tail is None:
                    continue  # unreadable: the load would miss anyway
                n += common_prefix(tail, ids[n:])
            matches.append(PrefixMatch(row.key, n, False))
        return matches

    def unusable(self, key: str) -> None:
        """`key` could not be restored: skip it until it is saved again (a new tail file)."""
        row = self.manager.pool.record(key)
        if row is not None:
            self._skip[key] = row.tail_file

    def _tail(self, name: str) -> list[int] | None:
        if name not in self._tails:
            if len(self._tails) > 4096:
                self._tails.clear()
            self._tails[name] = tail_tokens_of(self.manager.pool.tail_path(name))
        return self._tails[name]
