"""What Parley runs on, in one dict: `parley doctor` prints it and `parley bench` writes it into its JSON.

Kernels (state, active variant, the variants built and usable here), the CPU and its vector instruction
sets, the BLAS MLX uses, MLX's device, and versions (Parley, Python, MLX, mlx-lm): the facts that explain
a speed figure or a slow machine.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

import app


def active_setup() -> dict:
    """Facts about this machine and Parley's compute path. Loads MLX (call `fastblas.preload()` first)."""
    import mlx.core as mx

    from app import fastblas

    info = {
        "parley": app.__version__,
        "python": platform.python_version(),
        "mlx": getattr(mx, "__version__", None) or _version("mlx"),
        "mlx_lm": _version("mlx-lm"),
        "platform": platform.platform(terse=True),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        **_cpu_and_memory(),
        "device": str(mx.default_device()),
        "blas": fastblas.loaded or "bundled (reference)",
        "kernels": kernel_setup(),
    }
    return info


def kernel_setup() -> dict:
    """The C kernels: state ("on", "off", "not built", "refused"), active variant, threads, library, variants, and
    the prefill path they give (attention: fused kernel or BLAS tiles; fp32 weight copies: C or mx.dequantize)."""
    from app.errors import ParleyError
    from app.model import cpu_kernels
    from app.model.cpu_attention import FUSED_ROWS

    path = cpu_kernels.library_path()
    facts = {"state": "on", "variant": None, "quantized_decode": False, "requested": None, "threads": 1,
             "prefill_attention": "BLAS tiles", "fp32_expansion": "mx.dequantize",
             "library": str(path) if path else None, "variants": cpu_kernels.variants(),
             "cpu_features": cpu_kernels.cpu_features()}
    try:
        facts["requested"] = cpu_kernels.requested()
        lib = cpu_kernels.kernels() if path is not None else None  # (kernels() would also warn on stderr)
    except ParleyError as e:
        facts.update(state="refused", reason=str(e))
        return facts
    if lib is None:
        facts["state"] = "off" if facts["requested"] == "off" else "not built" if path is None else "not loaded"
        return facts
    facts["variant"] = cpu_kernels.active_variant()
    facts["quantized_decode"] = bool(lib.q4_fast())
    facts["threads"] = cpu_kernels.threads()  # the decode kernels' threads (PARLEY_THREADS)
    facts["prefill_attention"] = (f"fused C kernel for chunks over {FUSED_ROWS} rows; shorter chunks over a compact "
                                   "cache: C over the 4-bit blocks")
    facts["fp32_expansion"] = "C dequantizer (threaded), bitwise mx.dequantize"
    return facts


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_and_memory() -> dict:
    out: dict = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                out["cpu"] = line.split(":", 1)[1].strip()
                break
        mem_kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1])
        out["ram_gib"] = round(mem_kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        out.setdefault("cpu", platform.processor() or platform.machine())
    return out


def report(info: dict) -> str:
    """`parley doctor`'s text: one fact a line."""
    k = info["kernels"]
    if k["state"] == "on":
        kernels = f"on, {k['variant']} variant" + (" (4-bit decode gemv)" if k["quantized_decode"] else "") + \
            f", {k['threads']} thread{'s' if k['threads'] != 1 else ''} (PARLEY_THREADS)"
    elif k["state"] == "refused":
        kernels = f"refused: {k['reason']}"
    elif k["state"] == "not built":
        kernels = "not built (no C compiler at install): plain MLX, slower. Install gcc, then run scripts/setup"
    else:
        kernels = k["state"] + (" (PARLEY_KERNELS / PARLEY_CPU_KERNELS)" if k["state"] == "off" else "")
    variants = ", ".join(f"{name}{'' if v['usable'] else ' (not on this CPU)' if v['built'] else ' (not built)'}"
                         for name, v in k["variants"].items()) or "-"
    rows = [
        ("parley", info["parley"]), ("python", info["python"]), ("mlx", info["mlx"]), ("mlx-lm", info["mlx_lm"]),
        ("platform", f"{info['platform']} ({info['machine']}, {info['cpus']} CPUs, {info.get('ram_gib', '?')} GiB)"),
        ("cpu", info.get("cpu", "?")), ("instruction sets", k["cpu_features"]),
        ("mlx device", info["device"]), ("blas", info["blas"]),
        ("kernels", kernels), ("kernel variants", variants), ("kernel library", k["library"] or "-"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
