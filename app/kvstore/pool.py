"""The block pool on disk: content-addressed sealed blocks, per-cache tails, catalog rows.

Layout under `$PARLEY_HOME/caches/`:
  blocks/ab/<hash>.safetensors   one sealed 256-token block, all layers (immutable); for a model with
                                  sliding-window layers, its global layers only (`app.kvstore.window`)
  tails/<key>-<nonce>.safetensors the newest, unfinished block of one cache (rewritten per turn), plus
                                  the sliding-window layers' kept blocks

A cache (`key`: "conv:<id>" for a chat, "conv:<id>:<persona>" for a scene
member, "pre:<persona>:<preamble hash>" for a persona's preamble) is a row in
the `caches` table: the chain of block hashes plus the current tail file. The
pool reads and writes those rows only through the store it is handed
(`app.catalog.caches.CacheStore`); kvstore never imports the catalog.
Blocks are addressed by a hash chain over (model fingerprint, scheme, tokens),
so conversations that share a prefix share its blocks on disk.

Order of writes: files first (atomic), then the catalog row in one
transaction, then old tails are removed. A crash at any point leaves either
the old state or the new one; `reconcile` removes what a crash left behind.
Two processes on one PARLEY_HOME: block files are immutable and identical
for identical content; tails get unique names; so neither can corrupt the
other. Anything that fails verification is dropped and rebuilt by prefill.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx

from app.kvstore.blockfile import (BadCacheFile, HostTensor, chain_next, chain_root, discard, is_regular, prefetch,
                                  read_cache_file, scheme_id, write_cache_file)
from app.kvstore.conversation_cache import ConversationCache
from app.kvstore.fast_decode import Unsupported, start_working_copies
from app.kvstore.host_block import layer_blocks, stacked
from app.kvstore.live_cache import BLOCK_TOKENS, SealingKVCache, compact_applies
from app.kvstore.read_ahead import ReadAhead
from app.kvstore.window import global_layers, layer_list, local_layers, restore_windowed, window_arrays

GRACE_SECONDS = 600  # never reap files or rows younger than this: another process may be mid-save


class CacheWriteFailed(Exception):
    """A cache could not be written (full disk, read-only caches/): the cache is disposable, the turn is not."""


@dataclass(frozen=True)
class SaveReport:
    blocks_written: int
    bytes_written: int
    seconds: float


@dataclass(frozen=True)
class LoadMiss:
    """Why a cache could not be used; it has been dropped and will be rebuilt."""

    key: str
    reason: str


class BlockPool:
    def __init__(self, store, root: Path, fingerprint: str, scheme, n_layers: int, dtype=mx.float32,
                 kv_shape: tuple[int, int, int] | None = None, windows: list[int | None] | None = None):
        self.store = store  # app.catalog.caches.CacheStore: the rows of `caches` and `cache_blocks`
        self.root = root
        self.fingerprint = fingerprint
        self.scheme = scheme
        self.scheme_id = scheme_id(scheme)
        self.n_layers = n_layers
        self.dtype = dtype
        # (KV heads, key dim, value dim): known up front, a restore zero-fills its working copies while
        # the first block is still being read; learned from the first restore when not given
        self.kv_shape = kv_shape
        # per layer, its sliding window or None: a windowed model's block files hold the global layers only
        self.windows = windows if windows and any(windows) else None
        (root / "blocks").mkdir(parents=True, exist_ok=True, mode=0o700)
        (root / "tails").mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- paths -------------------------------------------------------------
    def block_path(self, block_hash: str) -> Path:
        return self.root / "blocks" / block_hash[:2] / f"{block_hash}.safetensors"

    def tail_path(self, name: str) -> Path:
        return self.root / "tails" / name

    def expected_header(self) -> dict[str, str]:
        """What every file of this pool's model and scheme says in its header."""
        expect = {"fingerprint": self.fingerprint, "scheme": self.scheme_id, "n_layers": str(self.n_layers)}
        if self.windows:  # files written before windowing (every layer in each block) lack it: rebuilt
            expect["layers"] = layer_list(self.windows)
        return expect

    # -- save --------------------------------------------------------------
    def save(self, key: str, cache: ConversationCache, conversation_id: int | None, persona_id: str) -> SaveReport:
        """Write the blocks the store lacks and a fresh tail, then point the row at them.

        Raises `CacheWriteFailed` when the disk or the catalog refuses (nothing half-written is left behind).
        """
        try:
            return self._save(key, cache, conversation_id, persona_id)
        except (OSError, RuntimeError, sqlite3.OperationalError) as exc:  # MLX reports a failed write as RuntimeError
            raise CacheWriteFailed(f"the cache of {key} could not be written to {self.root}: {exc}") from exc

    def _save(self, key: str, cache: ConversationCache, conversation_id: int | None, persona_id: str) -> SaveReport:
        started = time.perf_counter()
        hashes = cache.block_hashes()
        known = self.store.known_blocks(hashes)
        written = blocks_written = 0
        parent = chain_root(self.fingerprint, self.scheme_id)
        new_rows = []
        for i, h in enumerate(hashes):
            path = self.block_path(h)
            if h not in known or not is_regular(path):
                tokens = cache.tokens[i * BLOCK_TOKENS : (i + 1) * BLOCK_TOKENS]
                arrays = cache.block_arrays(i, global_layers(self.windows) if self.windows else None)
                size = write_cache_file(path, arrays, tokens, {**self.expected_header(), "kind": "block", "hash": h, "parent": parent})
                new_rows.append((h, len(tokens), size))
                written += size
                blocks_written += 1
            parent = h
        tail_name = f"{_safe(key)}-{os.urandom(6).hex()}.safetensors"
        tail, extra = cache.tail_arrays(), {}
        if self.windows:
            kept, extra["window_from"] = window_arrays(cache.layers, local_layers(self.windows))
            tail.update(kept)
            extra["window_from"] = str(extra["window_from"])
        tail_size = write_cache_file(self.tail_path(tail_name), tail, cache.tail_tokens,
                                     {**self.expected_header(), "kind": "tail", "key": key, "parent": parent, **extra})
        written += tail_size
        old = self.record(key)
        block_bytes = sum(self.store.known_blocks(hashes).values())
        block_bytes += sum(size for h, _, size in new_rows if h not in known)
        try:
            self.store.write(key, conversation_id, persona_id, self.fingerprint, self.scheme_id, cache.n_tokens, hashes,
                             tail_name, len(cache.tail_tokens), block_bytes + tail_size, new_blocks=new_rows)
        except sqlite3.IntegrityError:
            # the conversation was deleted while we saved (another thread or process): nothing to keep
            self.tail_path(tail_name).unlink(missing_ok=True)
            return SaveReport(0, 0, time.perf_counter() - started)
        except sqlite3.OperationalError:
            self.tail_path(tail_name).unlink(missing_ok=True)  # its row was not written; new blocks go at gc
            raise
        if old and old.tail_file != tail_name:
            self.tail_path(old.tail_file).unlink(missing_ok=True)
        return SaveReport(blocks_written, written, time.perf_counter() - started)

    # -- load --------------------------------------------------------------
    def load(self, key: str, shared: dict[str, dict] | None = None, drop_bad: bool = True) -> ConversationCache | LoadMiss | None:
        """The stored cache for `key`, a `LoadMiss` if it was bad (and is now dropped), or None.

        `drop_bad=False`: a reader that does not own the cache (`parley serve` borrowing a chat's prefix)
        leaves a bad one in place; its owner may be rewriting it this very moment in another process.
        """
        row = self.record(key)
        if row is None:
            return None
        miss = self._miss if drop_bad else LoadMiss
        if row.fingerprint != self.fingerprint or row.scheme != self.scheme_id:
            return miss(key, f"it was made with another model or scheme ({row.scheme})")
        try:
            hashes = row.chain
            layers, tokens = self._restore(row, hashes, shared or {})
        except BadCacheFile as exc:
            return miss(key, str(exc))
        except (ValueError, KeyError, IndexError) as exc:  # arrays that do not fit this model or scheme
            return miss(key, f"its arrays do not fit this model ({exc})")
        self.store.touch_blocks(hashes)
        return ConversationCache(layers, self.fingerprint, self.scheme_id, tokens, list(hashes))

    def _restore(self, row, hashes: list[str], shared: dict) -> tuple[list[SealingKVCache], list[int]]:
        """Read, verify and decode a stored cache into working copies, block by block (compact caches: read
        and verify only; their blocks stay encoded).

        The kernel is asked to read every file ahead (`prefetch`) and a helper
        thread reads and verifies the files in order (`ReadAhead`), so while
        this thread decodes one block the next ones are already arriving:
        restore costs about the read, not read + decode.
        """
        if self.windows:
            return restore_windowed(self, row, hashes, shared)
        parents = [chain_root(self.fingerprint, self.scheme_id), *hashes]
        tail_path = self.tail_path(row.tail_file)
        to_read = [i for i, h in enumerate(hashes) if h not in shared]
        paths = [self.block_path(hashes[i]) for i in to_read] + [tail_path]
        jobs = [partial(self.read_block, hashes[i], parents[i]) for i in to_read]
        jobs.append(partial(read_cache_file, tail_path, {**self.expected_header(), "kind": "tail", "key": row.key,
                                                         "parent": parents[-1]}))
        per_layer: list[list] = [[] for _ in range(self.n_layers)]
        whole_blocks, tokens, copies = [], [], None
        step = SealingKVCache(self.scheme).step
        decode = not compact_applies(self.scheme, self.dtype)  # compact caches take the blocks as read
        with ReadAhead(jobs, hint=partial(prefetch, paths[1:])) as files:
            if hashes and self.kv_shape and decode:  # zero-fill now, while the helper reads the first block
                copies = start_working_copies(self.scheme, self.n_layers, None, row.tokens, self.dtype, step,
                                              shape=self.kv_shape)
            for i, h in enumerate(hashes):
                if h in shared:
                    block, block_tokens = shared[h]
                else:
                    host, block_tokens = self._block_or_drop(h, partial(next, files))
                    block = layer_blocks(host, self.n_layers)
                    shared[h] = (block, block_tokens)
                whole = stacked(block)
                if i == 0 and copies is None and decode:
                    copies = start_working_copies(self.scheme, self.n_layers, whole, row.tokens, self.dtype, step)
                    self.kv_shape = self.kv_shape or (copies.shape if copies else None)
                copies = _add_block(copies, whole, both_cores=files.finished)
                whole_blocks.append(whole)
                for layer, b in zip(per_layer, block):
                    layer.append(b)
                tokens += block_tokens
            tail = next(files)
        tokens += tail.tokens
        if len(tokens) != row.tokens:
            raise BadCacheFile(f"it holds {len(tokens)} tokens, the catalog says {row.tokens}")
        tail_k, tail_v = tail.host["k"], tail.host["v"]
        if copies is None and decode and not hashes and tail_k.data.ndim == 4 and tail_k.data.shape[2]:
            copies = start_working_copies(self.scheme, self.n_layers, None, row.tokens, self.dtype, step,
                                          tail=(tail_k, tail_v))
        layers = _finish(copies, self.scheme, whole_blocks, per_layer, tail_k, tail_v, self.dtype)
        if layers and layers[0].offset != len(tokens):
            raise BadCacheFile(f"its arrays hold {layers[0].offset} tokens, its token ids {len(tokens)}")
        return layers, tokens

    def _block_or_drop(self, h: str, read) -> tuple[dict, list[int]]:
        """`read()`: block `h`'s verified contents; a bad block is dropped from the pool (on this thread: SQLite)."""
        try:
            return read()
        except BadCacheFile:
            self.drop_block(h)
            raise

    def read_block(self, h: str, parent: str) -> tuple[dict, list[int]]:
        """A block file's tensors (host memory) and tokens, verified against its address.

        Pure file work (no MLX, no SQLite): `_restore` runs it on its read-ahead thread.
        """
        f = read_cache_file(self.block_path(h), {**self.expected_header(), "kind": "block", "hash": h, "parent": parent})
        if chain_next(parent, f.tokens) != h or len(f.tokens) != BLOCK_TOKENS:
            raise BadCacheFile(f"block {h[:12]} does not hold the tokens its address says")
        return f.host, f.tokens

    def _miss(self, key: str, reason: str) -> LoadMiss:
        self.drop(key)
        return LoadMiss(key, reason)

    def drop_block(self, block_hash: str) -> None:
        discard(self.block_path(block_hash))
        self.store.delete_block(block_hash)

    # -- bookkeeping ---------------------------------------------------------
    def record(self, key: str):
        """The catalog's record of the cache `key` (app.catalog.caches.CacheRecord), or None."""
        return self.store.record(key)

    def has(self, key: str) -> bool:
        return self.record(key) is not None

    def drop(self, key: str) -> None:
        """Forget one cache (its unshared blocks go at the next `gc`)."""
        row = self.record(key)
        if row is None:
            return
        self.store.delete(key)
        discard(self.tail_path(row.tail_file))

    def forget_conversation(self, conversation_id: int, grace: float = 60.0) -> tuple[int, int]:
        """Remove every cache of a deleted conversation (rows may already be gone by cascade), then gc."""
        for key in self.store.keys_of_conversation(conversation_id):
            self.drop(key)
        prefix = _safe(self.store.conversation_key(conversation_id))
        for path in [*self.root.joinpath("tails").glob(f"{prefix}-*"), *self.root.joinpath("tails").glob(f"{prefix}_*")]:
            discard(path)
        return self.gc(grace)

    def gc(self, grace: float = GRACE_SECONDS) -> tuple[int, int]:
        """Remove blocks no cache references; return (files, bytes) freed.

        A block row is inserted in the same transaction as the cache row that
        uses it, so a block row nothing references is garbage at once. Files
        without any row may belong to another process's save in progress: those
        go only when older than `grace` seconds (see `reconcile`).
        """
        referenced = self.store.referenced_blocks()
        files = freed = 0
        for block in self.store.blocks():
            if block.hash not in referenced:
                path = self.block_path(block.hash)
                if os.path.lexists(path):
                    freed += discard(path)
                    files += 1
                self.store.delete_block(block.hash)
        f2, b2 = self.reconcile(grace)
        return files + f2, freed + b2

    def reconcile(self, grace: float = GRACE_SECONDS) -> tuple[int, int]:
        """After a crash: remove files without rows and rows without files."""
        cutoff = time.time() - grace
        block_rows = {b.hash for b in self.store.blocks()}
        tail_rows = self.store.tail_files()
        files = freed = 0
        for path in self.not_regular():  # never a cache file, whatever its age: gone at once
            freed += discard(path)
            files += 1
        for path in (self.root / "blocks").rglob("*.safetensors"):
            orphan = path.name.startswith(".tmp-") or path.stem not in block_rows
            if orphan and path.lstat().st_mtime < cutoff:
                freed += discard(path)
                files += 1
        for path in (self.root / "tails").glob("*.safetensors"):
            if path.name not in tail_rows and path.lstat().st_mtime < cutoff:
                freed += discard(path)
                files += 1
        for h in block_rows:
            if not is_regular(self.block_path(h)):
                self.store.delete_block(h)
        for row in self.store.records():
            if not is_regular(self.tail_path(row.tail_file)):
                self.store.delete(row.key)
        return files, freed

    def not_regular(self) -> list[Path]:
        """Folders, named pipes, sockets or links where block and tail files belong (never made by Parley)."""
        found = []
        for path in [*(self.root / "blocks").glob("*/*"), *(self.root / "tails").glob("*")]:
            if not is_regular(path):
                found.append(path)
        return found

    def verify(self) -> tuple[int, list[str]]:
        """Check every stored block and tail file; drop bad ones. Returns (files checked, problems).

        Caches made by another model or scheme are left alone (this model just
        does not use them); only damage is reported.
        """
        problems: list[str] = []
        checked = 0
        for path in self.not_regular():
            checked += 1
            discard(path)
            problems.append(f"{path.relative_to(self.root)} is not a regular file (removed; what used it is rebuilt "
                            "from the transcript)")
        for row in self.store.records(self.fingerprint, self.scheme_id):
            hashes = row.chain
            checked += len(hashes) + 1
            try:
                parent = chain_root(self.fingerprint, self.scheme_id)
                for h in hashes:
                    self._block_or_drop(h, partial(self.read_block, h, parent))
                    parent = h
                read_cache_file(self.tail_path(row.tail_file), {**self.expected_header(), "kind": "tail", "key": row.key,
                                "parent": hashes[-1] if hashes else chain_root(self.fingerprint, self.scheme_id)})
            except BadCacheFile as exc:
                self.drop(row.key)
                problems.append(f"{row.key}: {exc} (dropped; it will be rebuilt from the transcript)")
        referenced = self.store.referenced_blocks()
        for block in self.store.blocks():
            if block.hash in referenced or block.fingerprint != self.fingerprint or block.scheme != self.scheme_id:
                continue
            checked += 1
            try:
                read_cache_file(self.block_path(block.hash), {**self.expected_header(), "kind": "block", "hash": block.hash})
            except BadCacheFile as exc:
                self.drop_block(block.hash)
                problems.append(f"block {block.hash[:12]}: {exc} (dropped)")
        return checked, problems


def _add_block(copies, whole: dict, both_cores: bool):
    """Decode one block into the working copies; None (decode everything with MLX at the end) if C cannot.

    `both_cores`: the read-ahead thread is done, so the decode may take a second thread.
    """
    if copies is None:
        return None
    try:
        copies.add_block(whole, threads=None if both_cores else 1)  # None: DECODE_THREADS
        return copies
    except Unsupported:
        return None


def _finish(copies, scheme, whole_blocks, per_layer, tail_k: HostTensor, tail_v: HostTensor, dtype) -> list[SealingKVCache]:
    """The restored layers: from the working copies the C path filled, or decoded now by `restore_layers`."""
    if copies is not None:
        try:
            if tail_k.data.ndim == 4 and tail_k.data.shape[2]:
                copies.add_tail(tail_k, tail_v)
            return SealingKVCache.from_working_copies(scheme, per_layer, copies.result())
        except Unsupported:
            pass
    k, v = tail_k.to_mx(), tail_v.to_mx()
    layers = SealingKVCache.restore_layers(scheme, whole_blocks, per_layer, k, v, dtype)
    mx.eval([x for layer in layers for x in (layer.keys, layer.values) if x is not None])
    return layers


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in key)

