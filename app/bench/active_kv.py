"""RAM and resume time of an active conversation, full fp32 working copy vs compact (blocks only encoded).

`python -m app.bench.active_kv [--contexts 4096 8192] [--repeats 5] [--model SPEC]`

Prefills one conversation per context with the engine's `prefill` (the shipped text), saves it
with the block pool, then, for each round, in a FRESH process per mode and context (modes and
contexts interleaved, so the shared machine's drift spreads over all alike):

* resume: `BlockPool.load` (read, verify; the full mode also decodes every block into the fp32
  working copy) plus the first decode step's logits: the time from a new process having the
  model loaded to its first token over the restored conversation;
* decode: 16 greedy one-token steps after that (median step -> tokens/s); prefill: 512 new
  tokens over the restored conversation (the engine's `prefill`), after the RAM figure;
* RAM: the cache's own bytes (`ConversationCache.nbytes`: working copy + encoded blocks) and the
  process's resident set growth over the restore and 8 decode steps (MLX's freed-buffer cache
  cleared first), against the issue's bound 1.3 x the 4-bit bytes + one block of fp32.

mode "full" is `PARLEY_KV_COMPACT=0` (what Parley did before compact caches), "compact" the default.
Prints medians; the machine is shared, so the times are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {"full": "0", "compact": "1"}
PREFILL_MORE = 512  # new tokens prefilled over the restored conversation (after the RAM figure)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(model: str | None, home: Path, key: str, prefill_more: int = PREFILL_MORE) -> dict:
    """One measurement in this (fresh) process: resume `key`, decode, report."""
    import mlx.core as mx

    from app.bench import common
    from app.engine.generation import prefill
    from app.kvstore.live_cache import BLOCK_TOKENS
    from app.model.loader import load_model, resolve_model_folder

    lm = load_model(str(resolve_model_folder(model)))
    pool = common.make_pool(lm, home, "q4")
    mx.eval(lm.model(mx.array([[5, 6]])))  # kernels built and loaded before the clock starts
    mx.clear_cache()
    rss0 = _rss()
    t0 = time.perf_counter()
    cache = pool.load(key)
    logits = lm.model(mx.array([[7]]), cache=cache.layers)[0, -1]
    mx.eval(logits)
    resume = time.perf_counter() - t0
    cache.appended([7])
    steps = []
    for _ in range(16):
        t = int(mx.argmax(logits).item())
        t1 = time.perf_counter()
        logits = lm.model(mx.array([[t]]), cache=cache.layers)[0, -1]
        mx.eval(logits)
        steps.append(time.perf_counter() - t1)
        cache.appended([t])
    mx.clear_cache()
    grown = _rss() - rss0
    layer = cache.layers[0]
    one_block_fp32 = 2 * 4 * BLOCK_TOKENS * layer.keys.shape[1] * layer.keys.shape[3] * len(cache.layers)
    compact = all(getattr(x, "compact", False) for x in cache.layers)
    prefill_tps = 0.0
    if prefill_more:
        more = common.text_tokens(lm, prefill_more)
        t1 = time.perf_counter()
        for _ in prefill(lm.model, cache, more):
            pass
        prefill_tps = prefill_more / (time.perf_counter() - t1)
    return {"tokens": cache.n_tokens, "resume_ms": resume * 1000, "cache_mb": cache.nbytes / 2**20,
            "encoded_mb": cache.encoded_nbytes / 2**20, "rss_growth_mb": grown / 2**20,
            "bound_mb": (1.3 * cache.encoded_nbytes + one_block_fp32) / 2**20, "compact": compact,
            "decode_tps": 1 / sorted(steps)[len(steps) // 2], "prefill_tps": prefill_tps}


def store(model: str | None, home: Path, contexts: list[int]) -> dict[int, str]:
    from app.bench import common
    from app.catalog.caches import conversation_key
    from app.model.loader import load_model, resolve_model_folder

    lm = load_model(str(resolve_model_folder(model)))
    pool = common.make_pool(lm, home, "q4")
    ids = common.text_tokens(lm, max(contexts))
    whole, _ = common.fill(lm, pool, ids)  # one prefill; shorter contexts are its prefixes (the same values)
    keys = {}
    for n in contexts:
        keys[n] = conversation_key(n)
        pool.save(keys[n], whole.copy_prefix(n) if n < whole.n_tokens else whole, None, "p")
    return keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default=None, help="model spec (default: the embedded model)")
    parser.add_argument("--prefill-more", type=int, default=PREFILL_MORE, help="new tokens prefilled after (0: none)")
    parser.add_argument("--child", nargs=2, metavar=("HOME", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.model, Path(args.child[0]), args.child[1], args.prefill_more)))
        return 0
    with tempfile.TemporaryDirectory(prefix="parley-active-kv-") as tmp:
        home = Path(tmp) / "home"
        keys = store(args.model, home, args.contexts)
        runs: dict[tuple, list[dict]] = {}
        for _ in range(args.repeats):
            for n in args.contexts:
                for mode, flag in MODES.items():
                    cmd = [sys.executable, "-m", "app.bench.active_kv", "--child", str(home), keys[n],
                           "--prefill-more", str(args.prefill_more)]
                    if args.model:
                        cmd += ["--model", args.model]
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                         env={**os.environ, "PARLEY_KV_COMPACT": flag})
                    runs.setdefault((n, mode), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(report(runs))
    return 0


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def report(runs: dict[tuple, list[dict]]) -> str:
    lines = ["context  mode     resume_ms(median)  cache_MB  encoded_MB  rss_growth_MB(median)  bound_MB  within"
             "  decode_tps  prefill_tps(more)",
             "(shared 2-core machine: times are noisy; medians of fresh processes)"]
    for (n, mode), rs in sorted(runs.items()):
        resume = _median([r["resume_ms"] for r in rs])
        rss = _median([r["rss_growth_mb"] for r in rs])
        r = rs[0]
        within = "yes" if max(rss, r["cache_mb"]) <= r["bound_mb"] else "no"
        dec = _median([r["decode_tps"] for r in rs])
        pre = _median([r["prefill_tps"] for r in rs])
        lines.append(f"{n:>7}  {mode:<7}  {resume:>17.1f}  {r['cache_mb']:>8.1f}  {r['encoded_mb']:>10.1f}  "
                     f"{rss:>21.1f}  {r['bound_mb']:>8.1f}  {within:<6}  {dec:>10.1f}  {pre:>11.1f}   (runs: {len(rs)}; "
                     f"resume all: {', '.join('%.0f' % x['resume_ms'] for x in rs)})")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
