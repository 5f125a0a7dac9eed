"""Build and load the small C kernels of the CPU path, once per machine.

MLX's CPU backend computes exp/sigmoid one value at a time and has no fast
low-bit matmul; a few kernels in C (compiled with the system C compiler,
`-O3 -march=native`) fill those gaps on Linux. Libraries are cached under
`$XDG_CACHE_HOME/parley/kernels` (falling back to the temp folder), keyed by
source, flags and CPU, and replaced atomically so a half-built library is
never loaded. Without a compiler, or with `PARLEY_CPU_KERNELS=0`, callers get
None and stay on plain MLX.

Objects are compiled with -ffast-math but the library is linked without it:
linking with it pulls in crtfastmath.o, whose constructor turns on
flush-to-zero for the whole process the moment the library is loaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-fPIC"]


def cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        return next((line for line in info.splitlines() if line.startswith("flags")), "") + platform.processor()
    except OSError:
        return platform.machine()


def cache_folders() -> list[Path]:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "parley" / "kernels"
    return [base, Path(tempfile.gettempdir()) / f"parley-kernels-{os.getuid()}"]


def enabled() -> bool:
    return os.environ.get("PARLEY_CPU_KERNELS", "1") != "0" and sys.platform.startswith("linux")


def build(name: str, sources: list[Path]) -> ctypes.CDLL | None:
    """Compile the C `sources` (files under app/csrc, which also holds their headers) into one
    lib<name>-<key>.so (once) and load it; None if that is not possible."""
    if not enabled():
        return None
    texts = "".join(f.name + f.read_text() for f in sorted(CSRC.iterdir()) if f.suffix in (".c", ".h"))
    names = " ".join(str(f) for f in sources)
    key = hashlib.sha256((texts + names + " ".join(CFLAGS) + "|link-plain|" + cpu_id()).encode()).hexdigest()[:16]
    cc = os.environ.get("CC", "cc")
    for folder in cache_folders():
        lib = folder / f"{name}-{key}.so"
        try:
            if not lib.is_file():
                folder.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=folder) as tmp:
                    objs = [Path(tmp) / f"{src.stem}.o" for src in sources]
                    for src, obj in zip(sources, objs):
                        subprocess.run([cc, *CFLAGS, f"-I{CSRC}", "-c", "-o", str(obj), str(src)], check=True,
                                       capture_output=True, timeout=180)
                    out = Path(tmp) / "k.so"
                    subprocess.run([cc, "-shared", "-o", str(out), *map(str, objs), "-lm", "-lpthread"], check=True,
                                   capture_output=True, timeout=120)
                    os.replace(out, lib)
            return ctypes.CDLL(str(lib))
        except (OSError, subprocess.SubprocessError):
            continue
    return None
