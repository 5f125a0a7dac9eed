"""One cache file on disk: a sealed 256-token block, or a conversation's tail.

Format (safetensors, never pickle): one tensor per encoded array name, with
all layers stacked on axis 0, so a block is one file and one read. Header
metadata records the format version, model fingerprint, scheme, the exact
token ids, the block's chain hash and its parent's, and a CRC-32 over every
tensor's name, dtype, shape and bytes.

Reading trusts nothing: the file is read whole into host memory, its header
is parsed and bounds-checked in pure Python (every offset inside the file,
every size matching its shape), every recorded fact is compared with what
the caller expects and the checksum is recomputed. Any mismatch raises
`BadCacheFile`; callers drop the file and rebuild from the transcript.

Writing is crash-safe: temporary file in the same folder, fsync, atomic
rename, fsync of the folder. Files are created readable by the owner only:
they encode the conversation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

FORMAT_VERSION = "2"  # 2: CRC-32 checksums, own bounds-checked header reader


class BadCacheFile(Exception):
    """A cache file that must not be used: corrupt, foreign, truncated or from another version."""


def is_regular(path: Path) -> bool:
    """A plain file (not a folder, named pipe, socket, device, nor a link to one)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def discard(path: Path) -> int:
    """Remove whatever sits at `path` (a file, a folder, a named pipe...); return the bytes freed. Never raises."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    try:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


@dataclass(frozen=True)
class HostTensor:
    """A tensor's bytes in host memory (a view into the file's buffer) and its MLX dtype.

    numpy has no bfloat16, so those are held as uint16 and reinterpreted on the way into MLX.
    """

    data: np.ndarray
    dtype: mx.Dtype

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def to_mx(self, index: int | None = None) -> mx.array:
        """This tensor (or its `index`th slice on axis 0) as an MLX array (a copy)."""
        x = mx.array(self.data if index is None else self.data[index])
        return x.view(self.dtype) if self.dtype == mx.bfloat16 else x


@dataclass
class CacheFile:
    host: dict[str, HostTensor]  # name -> tensor stacked over layers, in host memory
    tokens: list[int]
    meta: dict[str, str]

    @property
    def arrays(self) -> dict[str, mx.array]:
        """The tensors as MLX arrays (copies): for callers off the restore path."""
        return {name: t.to_mx() for name, t in self.host.items()}


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


def checksum(arrays) -> str:
    """CRC-32 over every tensor's name, dtype, shape and bytes (MLX arrays or `HostTensor`s alike).

    It guards against damage (truncation, flipped bits, torn writes), not against
    someone who can write the owner-only cache folder; identity is the chain hash.
    CRC-32 instead of SHA-256: on restore it runs over every stored byte, and SHA-256
    alone cost half the restore. The bytes go through `crc32` (below): the same value
    as zlib's, folded with carry-less multiplication where the C kernels can.
    """
    crc = 0
    for name in sorted(arrays):
        a = arrays[name]
        if isinstance(a, HostTensor):
            dtype, shape, raw = a.dtype, a.data.shape, a.data
        else:
            dtype, shape = a.dtype, tuple(a.shape)
            raw = np.asarray(memoryview(mx.contiguous(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)))
        crc = zlib.crc32(f"{name}|{dtype}|{tuple(shape)}|".encode(), crc)
        crc = crc32(np.ascontiguousarray(raw).reshape(-1).view(np.uint8), crc)  # empty arrays too
    return f"crc32:{crc:08x}"


FAST_CRC_BYTES = 4096  # shorter buffers go to zlib (a ctypes call costs about what it saves there)


def crc32(data: np.ndarray, crc: int = 0) -> int:
    """zlib.crc32(data, crc) of a contiguous uint8 array, by the C kernels' carry-less fold when they have one
    (app/csrc/crc32.c: ~10x zlib's table loop, which was ~90 ms of a 4K conversation's restore), else zlib."""
    lib = _fast_crc()
    if lib is None or data.size < FAST_CRC_BYTES:
        return zlib.crc32(data, crc)
    return int(lib.crc32_update(crc, data.ctypes.data, data.size))


def _fast_crc():
    """The C kernels when their active variant folds CRC-32 on this CPU, else None (asked each time: tests switch
    variants; the answer is one C call)."""
    from app.model.cpu_kernels import kernels

    lib = kernels()
    return lib if lib is not None and lib.crc32_fast() else None


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
        if os.path.lexists(path) and not is_regular(path):
            discard(path)  # a folder or named pipe where a block belongs: it can only be in the way
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
    """Read and verify a cache file; `expect` lists metadata that must match exactly.

    The file is read whole with one `readinto` into host memory (no MLX: the engine's
    restore decodes straight from these bytes), its safetensors header is parsed and
    bounds-checked here, and every tensor is a view into that one buffer.
    """
    try:
        data = _read_whole(path)
    except FileNotFoundError:
        raise BadCacheFile(f"{path.name} is missing") from None
    except OSError as exc:
        raise BadCacheFile(f"{path.name} could not be read: {exc}") from None
    meta, host = parse_safetensors(data, path.name)
    if meta.get("format") != FORMAT_VERSION:
        raise BadCacheFile(f"{path.name} has format version {meta.get('format')!r}, expected {FORMAT_VERSION}")
    for key, value in expect.items():
        if meta.get(key) != value:
            raise BadCacheFile(f"{path.name}: {key} is {meta.get(key)!r}, expected {value!r}")
    try:
        tokens = [int(t) for t in json.loads(meta["tokens"])]
    except Exception as exc:
        raise BadCacheFile(f"{path.name} has unreadable token ids: {exc}") from None
    if checksum(host) != meta.get("checksum"):
        raise BadCacheFile(f"{path.name} fails its checksum")
    return CacheFile(host=host, tokens=tokens, meta=meta)


def prefetch(paths) -> None:
    """Ask the kernel to start reading these files now, so disk reads overlap the decode of earlier blocks."""
    if not hasattr(os, "posix_fadvise"):
        return
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)  # a named pipe must not block here
        except OSError:
            continue  # read_cache_file reports it
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def _read_whole(path: Path) -> np.ndarray:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a named pipe would block a plain open
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise BadCacheFile(f"{path.name} is not a regular file")
    with open(fd, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        data = np.empty(size, dtype=np.uint8)
        view, done = memoryview(data), 0
        while done < size:
            n = fh.readinto(view[done:])
            if not n:
                raise BadCacheFile(f"{path.name} is shorter than its size ({done} of {size} bytes)")
            done += n
    return data


# safetensors dtype -> (numpy dtype of the bytes, MLX dtype of the tensor)
_DTYPES = {
    "BOOL": (np.bool_, mx.bool_), "U8": (np.uint8, mx.uint8), "I8": (np.int8, mx.int8),
    "U16": (np.uint16, mx.uint16), "I16": (np.int16, mx.int16), "U32": (np.uint32, mx.uint32),
    "I32": (np.int32, mx.int32), "U64": (np.uint64, mx.uint64), "I64": (np.int64, mx.int64),
    "F16": (np.float16, mx.float16), "BF16": (np.uint16, mx.bfloat16), "F32": (np.float32, mx.float32),
}
_MAX_HEADER = 100 * 1024 * 1024


def parse_safetensors(data: np.ndarray, name: str) -> tuple[dict[str, str], dict[str, HostTensor]]:
    """(metadata, tensors) of a safetensors file held in `data`, every offset and size checked.

    Pure Python on purpose: a cache file is untrusted input, and a reader that
    cannot index outside `data` cannot crash the process on a crafted header.
    """
    def bad(why: str) -> BadCacheFile:
        return BadCacheFile(f"{name} is not a valid safetensors file: {why}")

    if data.size < 8:
        raise bad("too short")
    n = int(data[:8].view("<u8")[0])
    if n > min(_MAX_HEADER, data.size - 8):
        raise bad("header length out of range")
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("header is not an object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise bad("metadata is not a map of strings")
    body = data[8 + n :]
    tensors: dict[str, HostTensor] = {}
    spans = []
    for tname, info in header.items():
        try:
            np_dtype, mx_dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(f"tensor {tname!r} is described wrongly ({exc!r})") from None
        if any(d < 0 for d in shape) or not 0 <= begin <= end <= body.size:
            raise bad(f"tensor {tname!r} lies outside the file")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if (end - begin) != count * np.dtype(np_dtype).itemsize:
            raise bad(f"tensor {tname!r} has {end - begin} bytes for shape {list(shape)}")
        spans.append((begin, end))
        raw = body[begin:end]
        if raw.ctypes.data % np.dtype(np_dtype).itemsize:
            raw = raw.copy()  # unaligned (not written by us): copy rather than read misaligned
        tensors[tname] = HostTensor(raw.view(np_dtype).reshape(shape), mx_dtype)
    spans.sort()
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:])) or (spans and spans[-1][1] != body.size):
        raise bad("tensors overlap or do not fill the file")
    return meta, tensors
