"""One cache file on disk: a sealed 256-token block, or a conversation's tail.

Format (safetensors, never pickle): one tensor per encoded array name, with
all layers stacked on axis 0, so a block is one file and one read. Header
metadata records the format version, model fingerprint, scheme, the exact
token ids, the block's chain hash and its parent's, and a SHA-256 over every
tensor's name, dtype, shape and bytes.

Reading trusts nothing: the header is parsed by the `safetensors` library
(bounds-checked) before MLX touches the file, then every recorded fact is
compared with what the caller expects and the checksum is recomputed. Any
mismatch raises `BadCacheFile`; callers drop the file and rebuild from the
transcript.

Writing is crash-safe: temporary file in the same folder, fsync, atomic
rename, fsync of the folder. Files are created readable by the owner only:
they encode the conversation.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

FORMAT_VERSION = "1"


class BadCacheFile(Exception):
    """A cache file that must not be used: corrupt, foreign, truncated or from another version."""


@dataclass
class CacheFile:
    arrays: dict[str, mx.array]  # name -> array stacked over layers
    tokens: list[int]
    meta: dict[str, str]


def scheme_id(scheme) -> str:
    """The scheme as recorded on disk: its name plus the version of its encoding.

    A scheme whose encoding changes must bump `version`, so caches written by
    the old encoding become misses instead of being decoded wrongly.
    """
    return f"{scheme.name}.v{getattr(scheme, 'version', 1)}"


def chain_root(fingerprint: str, scheme: str) -> str:
    """The hash every chain starts from: blocks are only shared within one model and scheme."""
    return hashlib.sha256(f"parley-kv/{FORMAT_VERSION}/{fingerprint}/{scheme}".encode()).hexdigest()


def chain_next(parent: str, tokens: list[int]) -> str:
    """Content address of a block: its parent's hash and its own token ids."""
    return hashlib.sha256(parent.encode() + np.asarray(tokens, dtype="<i4").tobytes()).hexdigest()


def checksum(arrays: dict[str, mx.array]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = arrays[name]
        raw = a.view(mx.uint16) if a.dtype == mx.bfloat16 else a
        digest.update(f"{name}|{a.dtype}|{tuple(a.shape)}|".encode())
        digest.update(np.ascontiguousarray(np.asarray(raw)).reshape(-1).view(np.uint8))  # empty arrays too (an empty tail)
    return digest.hexdigest()


def write_cache_file(path: Path, arrays: dict[str, mx.array], tokens: list[int], meta: dict[str, str]) -> int:
    """Atomically write a cache file; return its size in bytes."""
    mx.eval(list(arrays.values()))
    header = dict(meta)
    header.update(format=FORMAT_VERSION, tokens=json.dumps(tokens), checksum=checksum(arrays))
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Dot-prefixed so start-up reconciliation can tell a stray temporary file apart.
    tmp_file = path.parent / f".tmp-{os.getpid()}-{os.urandom(6).hex()}.safetensors"
    try:
        mx.save_safetensors(str(tmp_file), arrays, metadata=header)
        os.chmod(tmp_file, 0o600)
        fd = os.open(tmp_file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_file, path)
    except BaseException:
        tmp_file.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path.stat().st_size


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_cache_file(path: Path, expect: dict[str, str]) -> CacheFile:
    """Read and verify a cache file; `expect` lists metadata that must match exactly."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise BadCacheFile(f"{path.name} is missing") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadCacheFile(f"{path.name} is not a valid safetensors file: {exc}") from None
    if meta.get("format") != FORMAT_VERSION:
        raise BadCacheFile(f"{path.name} has format version {meta.get('format')!r}, expected {FORMAT_VERSION}")
    for key, value in expect.items():
        if meta.get(key) != value:
            raise BadCacheFile(f"{path.name}: {key} is {meta.get(key)!r}, expected {value!r}")
    try:
        arrays = mx.load(str(path))
        tokens = [int(t) for t in json.loads(meta["tokens"])]
    except Exception as exc:
        raise BadCacheFile(f"{path.name} could not be read: {exc}") from None
    if checksum(arrays) != meta.get("checksum"):
        raise BadCacheFile(f"{path.name} fails its checksum")
    return CacheFile(arrays=arrays, tokens=tokens, meta=meta)
