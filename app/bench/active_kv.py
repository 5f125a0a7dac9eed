"""RAM of an active conversation against the issue's bound (1.3 x its 4-bit bytes + one block of fp32), and its resume.

`python -m app.bench.active_kv [--contexts 4096 8192] [--repeats 3] [--modes compact full] [--home DIR]`

Setup (this process): one conversation per context, prefilled with the engine's `prefill` (the shipped text,
chunks of 512, as a turn prefills) and saved with the block pool. The longest one is measured here too, live:
what the process holds after the prefill and a few decode steps, against what it held before, less the model's
fp32 weight copies that a long prefill builds (`cpu_linear`; the model's, not the conversation's).

Each round then runs, in a FRESH process per mode and context (interleaved, so the shared machine's drift spreads
over all alike), what a reply in a restarted `parley chat` does to that conversation: `Session.open`'s freed-memory
settings (`reuse_freed_memory` with the default 512 MB budget), a warm-up turn over a small stored conversation (so
imports, kernels and lazily made tables are not counted), then the measured turn: `BlockPool.load` (read, verify; the
full mode also decodes every block into an fp32 working copy), the engine's `prefill` of a new message
(`--new-tokens`) and its `decode` (greedy, `--decode` tokens).

RAM attributed to the conversation = the growth over that turn (restore + prefill + decode), seen four ways
(`app.bench.ram_probe`): process RSS, glibc malloc bytes in use, MLX active bytes, each with the allocators' freed
buffers let go before and after (`mx.clear_cache`, `malloc_trim`); RSS also as the app keeps them (MLX's cache
limit and glibc's trim threshold = the budget). Next to them the cache's own accounting: encoded (4-bit) bytes +
fp32 working copies (the tail) + the prefill scratch still held. `x4bit` = (max(RSS, malloc growth) - one fp32
block) / 4-bit bytes: the target is <= 1.3.

mode "full" is `PARLEY_KV_COMPACT=0` (sealed blocks also kept as an fp32 working copy: what Parley did before compact
caches), "compact" the default. Prints medians over the rounds; times are noisy on the shared machine.
The process preloads the BLAS `parley` uses (`app.fastblas`): without it every matmul ran on the reference
BLAS and the 8K setup prefill alone took most of an hour.
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

MODES = {"compact": "1", "full": "0"}
WARM_KEY_TOKENS = 512  # the warm-up conversation (a prefix of the measured ones)
BOUND_FACTOR = 1.3  # the issue: RAM <= 1.3 x 4-bit bytes + one block of fp32
MB = 2**20


def bound(encoded: int, fp32_block: int) -> float:
    return BOUND_FACTOR * encoded + fp32_block


def cache_accounting(cache) -> dict:
    """The cache's own bytes: encoded blocks, fp32 working copies, the prefill scratch (this thread's)."""
    from app.kvstore import prefill_scratch

    return {"encoded": cache.encoded_nbytes, "working": cache.working_nbytes, "scratch": prefill_scratch.held_bytes(),
            "fp32_block": cache.fp32_block_nbytes, "sealed_rows_fp32": cache.sealed_rows_in_working_copy,
            "tokens": cache.n_tokens, "compact": all(getattr(x, "compact", False) for x in cache.layers)}


def fp32_weight_bytes(model) -> int:
    """Bytes of the fp32 weight copies the CPU path built for prefill (`cpu_linear`), model-wide."""
    from app.model.cpu_linear import fp32_copies_nbytes

    return fp32_copies_nbytes(model)


def a_turn(lm, cache, new_ids: list[int], decode_steps: int) -> tuple[float, float]:
    """The engine's turn over `cache`: prefill `new_ids`, then greedy decode; (seconds to the first token, median
    seconds per later token)."""
    from app.engine.commands import Sampling
    from app.engine.generation import decode, prefill

    t0 = time.perf_counter()
    logits = None
    for step in prefill(lm.model, cache, new_ids):
        logits = step.logits
    stamps = []
    for _ in decode(lm.model, cache, logits, Sampling(temperature=0.0, max_tokens=decode_steps), set()):
        stamps.append(time.perf_counter())
    first = stamps[0] - t0
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:])) or [first]
    return first, gaps[len(gaps) // 2]


def child(model: str | None, home: Path, key: str, warm_key: str, new_tokens: int, decode_steps: int,
          prefill_more: int, budget_mb: float) -> dict:
    """One measurement in this (fresh) process: a turn over the restored `key`, and what it added."""
    from app.bench import common, ram_probe
    from app.engine.generation import prefill
    from app.kvstore.memory import reuse_freed_memory
    from app.model.loader import load_model, resolve_model_folder

    lm = load_model(str(resolve_model_folder(model)))
    pool = common.make_pool(lm, home, "q4")
    reuse_freed_memory(int(budget_mb * MB))  # as Session.open
    text = common.text_tokens(lm, 4096)
    new_ids = text[-new_tokens:]
    warm = pool.load(warm_key, shared={})
    a_turn(lm, warm, new_ids, decode_steps)
    del warm
    before = ram_probe.snapshot()
    t0 = time.perf_counter()
    cache = pool.load(key, shared={})
    restore_s = time.perf_counter() - t0
    first_s, step_s = a_turn(lm, cache, new_ids, decode_steps)
    kept = ram_probe.snapshot(release=False)  # freed buffers kept, as the app's settings let the allocators
    after = ram_probe.snapshot()
    grew = ram_probe.grown(before, after)
    result = {**cache_accounting(cache), **{f"grew_{k}": v for k, v in grew.items()},
              "grew_rss_kept": kept["rss"] - before["rss"], "mlx_cache_kept": kept["mlx_cache"],
              "restore_ms": restore_s * 1000, "ttft_ms": (restore_s + first_s) * 1000, "decode_tps": 1 / step_s,
              "fp32_weights": fp32_weight_bytes(lm.model)}
    if prefill_more:
        more = text[:prefill_more]
        t1 = time.perf_counter()
        for _ in prefill(lm.model, cache, more):
            pass
        result["prefill_tps"] = prefill_more / (time.perf_counter() - t1)
    return result


def store(model: str | None, home: Path, contexts: list[int], new_tokens: int, decode_steps: int, budget_mb: float
          ) -> tuple[dict[int, str], str, dict]:
    """Prefill and save one conversation per context (and the warm-up one); measure the longest live."""
    from app.bench import common, ram_probe
    from app.catalog.caches import conversation_key
    from app.kvstore.memory import reuse_freed_memory
    from app.model.loader import load_model, resolve_model_folder

    lm = load_model(str(resolve_model_folder(model)))
    pool = common.make_pool(lm, home, "q4")
    reuse_freed_memory(int(budget_mb * MB))  # as Session.open
    ids = common.text_tokens(lm, max(contexts))
    before = ram_probe.snapshot()
    t0 = time.perf_counter()
    whole, _ = common.fill(lm, pool, ids)  # one prefill; shorter contexts are its prefixes (the same values)
    prefill_s = time.perf_counter() - t0
    keys = {n: conversation_key(n) for n in contexts}
    warm_key = conversation_key(-1)
    for n, key in [*keys.items(), (WARM_KEY_TOKENS, warm_key)]:
        pool.save(key, whole.copy_prefix(n) if n < whole.n_tokens else whole, None, "p")
    a_turn(lm, whole, common.text_tokens(lm, 4096)[-new_tokens:], decode_steps)
    kept = ram_probe.snapshot(release=False)
    after = ram_probe.snapshot()
    weights = fp32_weight_bytes(lm.model)
    live = {**cache_accounting(whole), **{f"grew_{k}": v - weights for k, v in ram_probe.grown(before, after).items()
                                          if k != "mlx_cache"},
            "grew_rss_kept": kept["rss"] - before["rss"] - weights, "mlx_cache_kept": kept["mlx_cache"],
            "fp32_weights": weights, "prefill_tps": len(ids) / prefill_s, "context": max(contexts)}
    return keys, warm_key, live


def main(argv: list[str] | None = None) -> int:
    from app import fastblas

    fastblas.preload()  # as `parley` does (app.cli), before anything imports mlx
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--model", default=None, help="model spec (default: the embedded model)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens of the new message prefilled (default 16)")
    parser.add_argument("--decode", type=int, default=16, help="tokens decoded in the turn (default 16)")
    parser.add_argument("--budget-mb", type=float, default=512.0, help="the app's cache budget (MLX cache limit)")
    parser.add_argument("--prefill-more", type=int, default=0, help="new tokens prefilled after the figures (0: none)")
    parser.add_argument("--json", help="also write every run's figures here")
    parser.add_argument("--home", help="keep the stored conversations here and reuse them on the next run")
    parser.add_argument("--child", nargs=3, metavar=("HOME", "KEY", "WARM_KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        home, key, warm_key = args.child
        print(json.dumps(child(args.model, Path(home), key, warm_key, args.new_tokens, args.decode,
                               args.prefill_more, args.budget_mb)))
        return 0
    with tempfile.TemporaryDirectory(prefix="parley-active-kv-") as tmp:
        home = Path(args.home) if args.home else Path(tmp) / "home"
        keys, warm_key, live = set_up(args, home)
        runs: dict[tuple, list[dict]] = {}
        for _ in range(args.repeats):
            for n in args.contexts:
                for mode in args.modes:
                    runs.setdefault((n, mode), []).append(run_child(args, home, keys[str(n)], warm_key, mode))
    print(report(runs, live))
    if args.json:
        Path(args.json).write_text(json.dumps({"live": live, "runs": [
            {"context": n, "mode": mode, "runs": rs} for (n, mode), rs in sorted(runs.items())]}, indent=1))
    return 0


def set_up(args, home: Path) -> tuple[dict[str, str], str, dict]:
    """`store`, or what an earlier run with the same `--home` stored (its live figures included)."""
    saved = home / "active_kv.json"
    if saved.exists():
        keys, warm_key, live = json.loads(saved.read_text())
        if all(str(n) in keys for n in args.contexts):
            print(f"setup: reusing the conversations stored in {home}", flush=True)
            return keys, warm_key, live
    t0 = time.perf_counter()
    keys, warm_key, live = store(args.model, home, args.contexts, args.new_tokens, args.decode, args.budget_mb)
    keys = {str(n): k for n, k in keys.items()}
    saved.write_text(json.dumps([keys, warm_key, live]))
    print(f"setup: {max(args.contexts)}-token prefill at {live['prefill_tps']:.0f} tok/s, all saved in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return keys, warm_key, live


def run_child(args, home: Path, key: str, warm_key: str, mode: str) -> dict:
    cmd = [sys.executable, "-m", "app.bench.active_kv", "--child", str(home), key, warm_key,
           "--new-tokens", str(args.new_tokens), "--decode", str(args.decode), "--budget-mb", str(args.budget_mb),
           "--prefill-more", str(args.prefill_more)]
    if args.model:
        cmd += ["--model", args.model]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PARLEY_KV_COMPACT": MODES[mode]})
    if out.returncode:
        raise RuntimeError(f"measuring child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


HEADERS = ["run", "tokens", "4bit", "block", "bound", "own", "tail", "scratch", "rss", "malloc", "mlx", "x4bit",
           "vs_bound", "ok", "rss_kept", "mlx_kept", "x4bit_kept", "ttft_ms", "tok/s", "runs"]
LEGEND = """\
RAM attributed to the active conversation (MiB): the process's growth over the turn, freed buffers let go
  4bit: its encoded blocks; block: one block of fp32 (all layers); bound: 1.3 x 4bit + block (issue 14)
  own: the cache's accounting (4bit + tail: fp32 working copies + prefill scratch still held)
  rss / malloc / mlx: growth of RSS, glibc malloc in use, MLX active memory (restored blocks are host bytes, not MLX)
  x4bit = (max(rss, malloc) - block) / 4bit, target <= 1.3; vs_bound = max(rss, malloc, own) / bound, target <= 1
  *_kept: RSS growth / MLX cache with the freed buffers the app's settings keep for reuse (--budget-mb)"""


def row(label: str, rs: list[dict]) -> list:
    """One table row: the cache's accounting (the same every run), medians of the measured growths."""
    r = rs[0]
    med = {k: _median([x[k] for x in rs]) for k in ("grew_rss", "grew_malloc", "grew_mlx_active", "grew_rss_kept",
                                                   "mlx_cache_kept")}
    enc, blk = r["encoded"], r["fp32_block"]
    limit = bound(enc, blk)
    own = r["encoded"] + r["working"] + r["scratch"]
    measured = max(med["grew_rss"], med["grew_malloc"])
    worst = max(measured, own)
    timed = "ttft_ms" in r
    return [label, r["tokens"], enc / MB, blk / MB, limit / MB, own / MB, r["working"] / MB, r["scratch"] / MB,
            med["grew_rss"] / MB, med["grew_malloc"] / MB, med["grew_mlx_active"] / MB,
            round((measured - blk) / enc, 2),
            round(worst / limit, 2), "yes" if worst <= limit else "NO", med["grew_rss_kept"] / MB,
            med["mlx_cache_kept"] / MB, round((med["grew_rss_kept"] - blk) / enc, 2),
            _median([x["ttft_ms"] for x in rs]) if timed else "-",
            _median([x["decode_tps"] for x in rs]) if timed else "-",
            len(rs)]


def report(runs: dict[tuple, list[dict]], live: dict | None = None) -> str:
    from app.bench.common import table

    rows = [row(f"live {live['context']} prefill", [live])] if live is not None else []
    rows += [row(f"restore {n} {mode}", rs) for (n, mode), rs in sorted(runs.items())]
    all_runs = ([live] if live else []) + [r for rs in runs.values() for r in rs]
    weights = max((r.get("fp32_weights", 0) for r in all_runs), default=0)
    return "\n".join([LEGEND, table(HEADERS, rows),
                      f"(the model's fp32 weight copies after a long prefill: {weights / MB:.0f} MiB, not counted; "
                      "medians of fresh processes; the machine is shared, times are noisy)"])


if __name__ == "__main__":
    raise SystemExit(main())
