"""What a process holds in memory, from four angles, for attributing RAM to one active conversation.

A figure taken before and one after restoring (or prefilling) a conversation and running a turn over it:
their difference is what that conversation added. Each angle sees something the others miss:

* `rss`: the process's resident set (/proc/self/statm), everything that costs RAM, freed memory an
  allocator keeps mapped for reuse included (so a delta may be low when it reuses pages freed earlier);
* `malloc`: bytes glibc's malloc has handed out and not had back (`mallinfo2`: heap blocks in use plus
  mmapped blocks): MLX's buffers, numpy's arrays and the block files' bytes, not freed-but-kept pages;
* `mlx_active` / `mlx_cache`: MLX's own counters, bytes in live arrays and freed buffers MLX keeps for reuse
  (up to `mx.set_cache_limit`, which `Session.open` raises to the cache budget: `app.kvstore.memory`).

`Session.open` also has glibc keep freed memory mapped (`app.kvstore.memory`), so without letting it go first
(`release_freed`) an RSS delta may count pages freed long before or miss pages the turn reused.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


_mallinfo2 = None


def rss() -> int:
    """Resident bytes of this process (Linux; 0 where there is no /proc)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def malloc_in_use() -> int:
    """Bytes glibc's malloc has handed out (heap and mmapped blocks), or 0 without glibc >= 2.33."""
    global _mallinfo2
    if _mallinfo2 is None:
        _mallinfo2 = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                fn = ctypes.CDLL("libc.so.6").mallinfo2
                fn.restype = _MallInfo2
                _mallinfo2 = fn
            except (OSError, AttributeError):
                pass
    if not _mallinfo2:
        return 0
    info = _mallinfo2()
    return int(info.uordblks + info.hblkhd)


def release_freed() -> bool:
    """Let go of every freed buffer the allocators keep for reuse: MLX's cache (`mx.clear_cache`) and glibc's
    freed heap pages (`malloc_trim(0)`), so RSS counts only memory in use. False where there is no glibc."""
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0)) or True
    except (OSError, AttributeError):
        return False


def snapshot(release: bool = True) -> dict[str, int]:
    """Every angle now, after a garbage collection (dropped Python objects gone) and, with `release`, with the
    allocators' freed buffers let go (`release_freed`); without, as the process keeps them."""
    import mlx.core as mx

    gc.collect()
    if release:
        release_freed()
    return {"rss": rss(), "malloc": malloc_in_use(), "mlx_active": mx.get_active_memory(),
            "mlx_cache": mx.get_cache_memory()}


def grown(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """What each angle grew by from `before` to `after`."""
    return {name: after[name] - before[name] for name in before}
