"""The C kernels of the CPU path: one library built when Parley is installed, loaded here with ctypes.

MLX's CPU backend computes exp/sigmoid one value at a time and has no fast low-bit matmul; a few kernels
in C fill those gaps on Linux: softmax and decode attention (app/csrc/attention.c), SiLU*up
(activations.c), the 4/8-bit gemv and its row-batched twin (qgemv.c), the KV block decoder (kv_decode.c),
the decode attention over encoded KV blocks (q4_attention.c), the whole one-token step of a llama model
(decode_step.c).
setup.py compiles them into `app/_kernels*.so` three times over (AVX-512, AVX2+FMA, portable) behind a
dispatcher (dispatch.c) that picks the best variant this CPU runs when the library loads.

The library is only ever loaded from the package folder, and not if it or its folder is writable by every
user: nothing is compiled or cached at run time (the old runtime compile wrote to a predictable
/tmp/parley-kernels-<uid> folder that another local user could plant a library in).

`PARLEY_THREADS=N` sets the threads of the decode kernels (app/csrc/threads.c; default min(cores, 2), 1 = the
calling thread alone); their results are bitwise the same on any count.
`PARLEY_KERNELS=avx512|avx2|portable|off` forces a variant (one the CPU cannot run is refused with a
`KernelChoiceError`); `PARLEY_CPU_KERNELS=0` (older name) means off. Without the library (no C compiler at
install) `kernels()` is None, callers stay on plain MLX and one warning line says what to install.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import logging
import os
import stat
import sys
from pathlib import Path

from app.errors import BadInput

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parent.parent
VARIANTS = ("portable", "avx2", "avx512")  # index = the library's variant number
MAX_THREADS = 16  # PARLEY_MAX_THREADS in app/csrc/threads.h
CHOICES = (*VARIANTS, "off")
NOT_BUILT = ("Parley's C kernels are not built (no C compiler when Parley was installed): running on plain MLX, "
             "2-3x slower on the CPU. Install gcc (Debian/Ubuntu: sudo apt-get install gcc libc6-dev) and run "
             "scripts/setup again (or pip install -e .).")

_kernels: ctypes.CDLL | None | bool = False  # False: not tried yet
_warned = False


class KernelChoiceError(BadInput):
    """PARLEY_KERNELS names a variant that does not exist or that this CPU cannot run."""


def library_path() -> Path | None:
    """The built library in the package folder (`app/_kernels<ext suffix>`), or None if it was not built."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = PACKAGE / f"_kernels{suffix}"
        if path.is_file():
            return path
    return None


def requested() -> str | None:
    """The variant PARLEY_KERNELS asks for ("off" also for PARLEY_CPU_KERNELS=0), or None: the best one."""
    if os.environ.get("PARLEY_CPU_KERNELS", "1") == "0":
        return "off"
    want = os.environ.get("PARLEY_KERNELS", "").strip().lower()
    if not want:
        return None
    if want not in CHOICES:
        raise KernelChoiceError(f"PARLEY_KERNELS={want!r} is not a kernel variant: use one of {', '.join(CHOICES)}, "
                                "or unset it to use the best one this CPU runs.")
    return want


def kernels() -> ctypes.CDLL | None:
    """The C kernels, or None (switched off, not Linux, or not built: the last says so once)."""
    global _kernels
    if _kernels is not False:
        return _kernels
    want, threads_wanted = requested(), requested_threads()
    if want == "off" or not sys.platform.startswith("linux"):
        _kernels = None
        return None
    lib = _load()
    if lib is not None:
        _switch(lib, want or _best(lib))  # also undoes an earlier use_variant / PARLEY_KERNELS (tests)
        lib.parley_set_threads(threads_wanted or 0)  # 0: the default, min(cores, 2) (also undoes set_threads)
    _kernels = lib
    return lib


def requested_threads() -> int | None:
    """The thread count PARLEY_THREADS asks for (1 = the calling thread alone), or None: min(cores, 2)."""
    raw = os.environ.get("PARLEY_THREADS", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_THREADS:
        raise KernelChoiceError(f"PARLEY_THREADS={raw!r} is not a thread count: use 1 to {MAX_THREADS} "
                                "(1 = no helper threads), or unset it to use min(cores, 2).")
    return int(raw)


def reset() -> None:
    """Forget the loaded library, so the next `kernels()` looks again (after PARLEY_KERNELS changed; tests)."""
    global _kernels
    _kernels = False


def _load() -> ctypes.CDLL | None:
    path = library_path()
    if path is None:
        _warn_once(NOT_BUILT)
        return None
    unsafe = _writable_by_others(path)
    if unsafe is not None:
        _warn_once(f"Parley's C kernels are not loaded: {unsafe} is writable by every user, so anyone could replace "
                   f"the code (chmod o-w {unsafe}). Running on plain MLX.")
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        _warn_once(f"Parley's C kernels could not be loaded ({e}): running on plain MLX. Reinstall (scripts/setup).")
        return None
    _declare(lib)
    return lib


def _writable_by_others(path: Path) -> Path | None:
    """The library or its folder if writable by every user (world-writable, sticky or not), else None."""
    for p in (path, path.parent):
        if os.stat(p).st_mode & stat.S_IWOTH:
            return p
    return None


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning(message)


def _declare(k: ctypes.CDLL) -> None:
    L, P, I = ctypes.c_long, ctypes.c_void_p, ctypes.c_int
    signatures = {
        "causal_softmax": [P, L, L, L, L, I],
        "silu_mul": [P, P, L],
        "q4_gemv": [P, P, P, P, P, L, L],
        "q8_gemv": [P, P, P, P, P, L, L],
        "q4_rows": [P, P, P, P, P, L, L, L],
        "q8_rows": [P, P, P, P, P, L, L, L],
        "attn_decode": [P, P, P, P, P, L, L, L, L, L, L, ctypes.c_float],
        "kv_decode_jobs": [P, L, P, L],
        "kvq_attn_decode": [P, P, P, P, L, L, L, L, ctypes.c_float, P, P, L, P, P, P, L, L, L, L],
    }
    for name, args in signatures.items():
        fn = getattr(k, name)
        fn.argtypes, fn.restype = args, None
    k.decode_step.argtypes, k.decode_step.restype = [P, P, P, ctypes.c_float, L, P, L, P], I
    k.kvq_attn_rows.argtypes = [P, P, P, L, L, L, L, L, ctypes.c_float, P, P, L, P, P, P, L, L, L, L]
    k.kvq_attn_rows.restype = I
    k.crc32_update.argtypes, k.crc32_update.restype = [ctypes.c_uint, P, L], ctypes.c_uint
    k.prefill_attention.argtypes, k.prefill_attention.restype = [P, P, P, P, L, L, L, L, L, L, L, L, L, L, I], I
    k.dequantize_rows.argtypes, k.dequantize_rows.restype = [P, P, P, P, L, L, L, L], I
    for name in ("q4_fast", "q4_rows_fast", "kvq_has_avx2", "crc32_fast", "parley_variant_count", "parley_active_variant"):
        getattr(k, name).restype = I
    for name in ("parley_variant_built", "parley_variant_usable", "parley_use_variant"):
        getattr(k, name).argtypes, getattr(k, name).restype = [I], I
    k.parley_threads.argtypes, k.parley_threads.restype = [], L
    k.parley_set_threads.argtypes, k.parley_set_threads.restype = [L], I
    k.parley_min_work.argtypes, k.parley_min_work.restype = [], L
    k.parley_set_min_work.argtypes, k.parley_set_min_work.restype = [L], None
    k.parley_pool_stats.argtypes, k.parley_pool_stats.restype = [P], None
    k.parley_pool_back_off.argtypes, k.parley_pool_back_off.restype = [L], None


def variants() -> dict[str, dict[str, bool]]:
    """Each variant: built into the library, and usable (built and this CPU runs it). Empty without the library."""
    path = library_path()
    if path is None or _writable_by_others(path) is not None:
        return {}
    k = ctypes.CDLL(str(path))  # the same loaded library as kernels()'s, if that is loaded
    _declare(k)
    return {name: {"built": bool(k.parley_variant_built(i)), "usable": bool(k.parley_variant_usable(i))}
            for i, name in enumerate(VARIANTS)}


def active_variant() -> str | None:
    """The variant the kernels run now, or None when they are off or missing."""
    k = kernels()
    return None if k is None else VARIANTS[k.parley_active_variant()]


def use_variant(name: str) -> None:
    """Run every kernel as variant `name` from now on (tests; PARLEY_KERNELS does it at load)."""
    k = kernels()
    if k is None:
        raise KernelChoiceError(f"cannot use the {name} kernels: the C kernels are off or not built")
    _switch(k, name)


def threads() -> int:
    """Threads the decode kernels use (caller included; app/csrc/threads.c): PARLEY_THREADS, else
    min(available cores, 2). 1 when the kernels are off."""
    k = kernels()
    return 1 if k is None else int(k.parley_threads())


def set_threads(n: int) -> None:
    """Run the decode kernels on `n` threads from now on (tests; PARLEY_THREADS does it at load)."""
    k = kernels()
    if k is None:
        raise KernelChoiceError("cannot set the kernel threads: the C kernels are off or not built")
    if k.parley_set_threads(n) != 0:
        raise KernelChoiceError(f"{n} is not a kernel thread count: use 1 to {MAX_THREADS} (PARLEY_THREADS)")


def set_min_work(work: int) -> int:
    """Thread jobs of at least `work` multiply-adds (0: all, as tests do on the tiny model); returns the
    previous threshold."""
    k = kernels()
    if k is None:
        raise KernelChoiceError("cannot set the kernel threads: the C kernels are off or not built")
    before = int(k.parley_min_work())
    k.parley_set_min_work(work)
    return before


def pool_stats() -> dict[str, int]:
    """The thread pool's counters since load (app/csrc/threads.c): jobs shared with the helpers, chunks
    the helpers ran, stalls (a helper descheduled mid-chunk), jobs run alone while backing off."""
    k = kernels()
    if k is None:
        return {"shared": 0, "helper_chunks": 0, "stalls": 0, "alone": 0}
    out = (ctypes.c_long * 4)()
    k.parley_pool_stats(out)
    return dict(zip(("shared", "helper_chunks", "stalls", "alone"), out))


def _best(k: ctypes.CDLL) -> str:
    return next(name for i, name in reversed(list(enumerate(VARIANTS))) if k.parley_variant_usable(i))


def _switch(k: ctypes.CDLL, name: str) -> None:
    if name not in VARIANTS:
        raise KernelChoiceError(f"{name!r} is not a kernel variant: use one of {', '.join(VARIANTS)}")
    i = VARIANTS.index(name)
    if k.parley_use_variant(i) != 0:
        why = "were not built into the library (they need GCC on x86-64)" if not k.parley_variant_built(i) else \
            f"need CPU features this machine lacks ({cpu_features()})"
        usable = [v for j, v in enumerate(VARIANTS) if k.parley_variant_usable(j)]
        raise KernelChoiceError(f"the {name} kernels {why}: set PARLEY_KERNELS to one of {', '.join(usable + ['off'])}, "
                                "or unset it to use the best one this CPU runs.")


def cpu_features() -> str:
    """The vector instruction sets this CPU reports that matter to the kernels (Linux /proc/cpuinfo)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith(("flags", "Features"))), [])
    except OSError:
        return "unknown"
    wanted = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma", "avx", "sse4_2", "asimd", "neon")
    have = [f for f in wanted if f in flags]
    return ", ".join(have) or "none of avx/avx2/avx512/neon"


_float16_table = None


def float16_table():
    """float16 -> float32 for every 16-bit pattern, exactly as MLX converts them (the table is what MLX
    computes): the KV kernels read stored float16 values through it. Built once."""
    global _float16_table
    if _float16_table is None:
        import mlx.core as mx
        import numpy as np

        table = mx.arange(65536, dtype=mx.uint32).astype(mx.uint16).view(mx.float16).astype(mx.float32)
        _float16_table = np.array(table, copy=True)
    return _float16_table


def data_pointer(a) -> int:
    """Address of an evaluated, row-contiguous fp32 MLX array's data (shared, not copied), for a kernel that
    writes into it. Raises ValueError for anything else (a C write through a wrong layout corrupts memory)."""
    import numpy as np

    view = np.asarray(memoryview(a))
    if not view.flags.c_contiguous or view.dtype != np.float32:
        raise ValueError(f"C kernel buffer must be contiguous float32, got {view.dtype} with strides {view.strides}")
    return view.ctypes.data


def fresh(a):
    """Evaluate `a` (an MLX array) into its own contiguous buffer that the kernels may overwrite."""
    import mlx.core as mx
    import numpy as np

    mx.eval(a)
    if not np.asarray(memoryview(a)).flags.c_contiguous:
        a = mx.contiguous(a)
        mx.eval(a)
    return a
