"""RAM and disk of a long gemma3 conversation with and without windowed local layers:
`python -m app.bench.windows [--tokens 1000 2000]`.

Builds the tiny random gemma3 (`app.model.tiny_zoo`: window 8, two local layers and one global), prefills
each length into a windowed cache (as Parley runs it) and into a full one (every layer keeps every block:
Parley before the local layers dropped theirs), saves both to a fresh pool and prints the encoded bytes
in RAM and the bytes on disk. With windows, only the global layer's share grows with the conversation.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def measure(lm, home: Path, n: int, windowed: bool) -> dict:
    from app.bench.common import make_pool
    from app.engine import generation
    from app.kvstore.conversation_cache import ConversationCache
    from app.kvstore.schemes import get_scheme

    pool = make_pool(lm, home, "q4")
    if not windowed:
        pool.windows = None
    cache = ConversationCache.empty(lm.n_layers, get_scheme("q4"), lm.fingerprint)
    real = generation.sliding_windows
    if not windowed:
        generation.sliding_windows = lambda model: [None] * len(model.layers)
    try:
        for _ in generation.prefill(lm.model, cache, [5 + (i * 11) % 300 for i in range(n)]):
            pass
    finally:
        generation.sliding_windows = real
    pool.save("conv", cache, None, "p")
    disk = sum(p.stat().st_size for p in (home / "caches").rglob("*.safetensors"))
    return {"encoded_ram_kb": cache.encoded_nbytes / 1024, "working_copy_kb": (cache.nbytes - cache.encoded_nbytes) / 1024,
            "disk_kb": disk / 1024}


def main(argv: list[str] | None = None) -> int:
    from app import fastblas

    fastblas.preload()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1000, 2000])
    args = parser.parse_args(argv)
    from app.model.loader import load_model
    from app.model.tiny_zoo import build_tiny_arch

    with tempfile.TemporaryDirectory() as tmp:
        lm = load_model(str(build_tiny_arch(Path(tmp) / "gemma3", "gemma3", "q4g64")))
        print(f"{'tokens':>7} {'way':>10} {'encoded RAM KB':>15} {'working copy KB':>16} {'disk KB':>9}")
        for n in args.tokens:
            for way in ("full", "windowed"):
                r = measure(lm, Path(tmp) / f"{way}-{n}", n, way == "windowed")
                print(f"{n:>7} {way:>10} {r['encoded_ram_kb']:>15,.0f} {r['working_copy_kb']:>16,.0f} {r['disk_kb']:>9,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
