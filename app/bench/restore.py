"""`parley bench restore`: restoring a cache from disk against reading its bytes, and against re-prefill.

For each context (1K-8K tokens of the shipped text) a q4 cache is prefilled by
the engine's `prefill` and saved by the block pool. Then, median of `repeats`:

* raw read: every block file and the tail file read whole with the restore's own
  prefetching read (`common.raw_read`: a `ReadAhead` helper thread plus the
  kernel prefetch hint, no checks, no decode: a fair floor) - once with the files dropped from the OS page cache first
  (posix_fadvise DONTNEED, so the bytes come from the disk) and once with them
  in the page cache (memory bandwidth only).
* restore: `BlockPool.load` - safetensors header checks, checksum of every
  block, token-chain verification, decode of the 4-bit blocks into the
  full-precision working copy the model attends over - again from disk and
  from the page cache. Split into its two halves: read+verify
  (`read_cache_file` of every file) and decode (`SealingKVCache.restore`).
* re-prefill: the engine's prefill of the same tokens (what a miss costs): one run,
  the one that makes the cache (`parley bench ttft` has medians of cold prefills).
* first restore: the first load of each cache in this process, from disk, before
  any memory of its size was freed for reuse (the page faults of a fresh working
  copy are in it); the medians above run with memory set up as the app sets it
  (`reuse_freed_memory` with the default 512 MB budget).

The issue's target is restore <= 1.5x raw read of the same bytes.
"""

from __future__ import annotations

import time

from app.bench import common

CONTEXTS = (1024, 2048, 4096, 8192)
QUICK_CONTEXTS = (1024, 2048)
APP_BUDGET_BYTES = 512 << 20  # the app's default --budget-mb
TAIL_SHORT = 40  # the cache holds context - 40 tokens: 40 short of a block boundary


def run(lm, args) -> dict:
    contexts = getattr(args, "restore_contexts", None) or (QUICK_CONTEXTS if common.quick(args) else CONTEXTS)
    with common.temp_home() as home:
        return measure(lm, home, contexts, common.repeats(args), say=lambda m: common.log(args, m))


def measure(lm, home, contexts, repeats: int = 3, say=print) -> dict:
    """Store one cache per context, then time them in rounds: every context once per round.

    Rounds instead of all repeats of one context in a row: this VM's disk (and the host's cache
    behind it) drifts over minutes, and interleaving spreads that drift over every context alike.
    """
    from app.kvstore.memory import reuse_freed_memory

    reuse_freed_memory(APP_BUDGET_BYTES)  # as the app does (Session.open)
    pool = common.make_pool(lm, home, "q4")
    ids_all = common.text_tokens(lm, max(contexts))
    common.fill(lm, pool, ids_all[:256])  # warm-up
    stored = [_store(lm, pool, ids_all, context) for context in contexts]
    dropped = True
    for _ in range(repeats):
        for st in stored:
            dropped &= _one_round(pool, st)
    rows = [_row(st, dropped) for st in stored]
    for row in rows:
        say(f"  restore {row['context_tokens']} tokens: restore {row['restore_disk_ms']} ms from disk, "
            f"raw read {row['raw_read_disk_ms']} ms, re-prefill {row['reprefill_ms']} ms")
    return {"scheme": "q4", "repeats": repeats, "target_restore_over_raw": 1.5, "rows": rows}


def _store(lm, pool, ids_all: list[int], context: int) -> dict:
    """Prefill and save one cache (as a turn leaves it: sealed blocks plus a partial tail), then restore it once."""
    n = context - TAIL_SHORT
    # One prefill (it makes the cache); `parley bench ttft` has the medians of cold prefills.
    (cache, _), prefill_s = common.timed(common.fill, lm, pool, ids_all[:n])
    key = f"bench:{n}"
    pool.save(key, cache, None, "bench")
    files = common.cache_files(pool, key)
    working_bytes = cache.nbytes - cache.encoded_nbytes  # the fp32 working copy (compact caches: the tail only)
    del cache
    st = {"context": context, "n": n, "key": key, "files": files, "nbytes": sum(p.stat().st_size for p in files),
          "working_bytes": working_bytes, "prefill_s": prefill_s,
          "runs": {k: [] for k in ("raw_disk", "raw_cached", "restore_disk", "restore_cached", "read_verify", "decode")}}
    common.drop_page_cache(files)
    st["first_restore_s"] = common.timed(_load, pool, st)[1]
    return st


def _one_round(pool, st: dict) -> bool:
    """One of each timing for one stored cache; False if the page cache could not be dropped."""
    files, runs = st["files"], st["runs"]
    dropped = common.drop_page_cache(files)
    runs["raw_disk"].append(common.raw_read(files)[1])
    runs["raw_cached"].append(common.raw_read(files)[1])
    dropped &= common.drop_page_cache(files)
    runs["restore_disk"].append(common.timed(_load, pool, st)[1])
    runs["restore_cached"].append(common.timed(_load, pool, st)[1])
    rv, dec = _parts(pool, st)
    runs["read_verify"].append(rv)
    runs["decode"].append(dec)
    return dropped


def _load(pool, st: dict):
    import mlx.core as mx

    from app.kvstore.conversation_cache import ConversationCache

    c = pool.load(st["key"])
    assert isinstance(c, ConversationCache) and c.n_tokens == st["n"], c
    # BlockPool.load evaluates keys and values; make sure of it here, so restore is the whole cost
    # of getting the working copy.
    mx.eval([layer.values for layer in c.layers])
    return c


def _parts(pool, st: dict) -> tuple[float, float]:
    """_load in two halves, one after the other: read+verify every file, then decode into the working copy."""
    import mlx.core as mx

    from app.kvstore.blockfile import chain_root, read_cache_file
    from app.kvstore.host_block import layer_blocks
    from app.kvstore.live_cache import SealingKVCache

    hashes = pool.record(st["key"]).chain
    t0 = time.perf_counter()
    blocks, parent = [], chain_root(pool.fingerprint, pool.scheme_id)
    for h in hashes:
        blocks.append(pool.read_block(h, parent)[0])  # as the restore reads them, on one thread
        parent = h
    tail = read_cache_file(st["files"][-1], {**pool.expected_header(), "kind": "tail", "key": st["key"], "parent": parent})
    t1 = time.perf_counter()
    per_block = [layer_blocks(host, pool.n_layers) for host in blocks]
    per_layer = [[b[i] for b in per_block] for i in range(pool.n_layers)]
    layers = SealingKVCache.restore_layers(pool.scheme, blocks, per_layer, tail.host["k"], tail.host["v"], pool.dtype)
    assert len(layers) == pool.n_layers and layers[0].offset == st["n"]
    mx.eval([l.keys for l in layers] + [l.values for l in layers])
    return t1 - t0, time.perf_counter() - t1


def _row(st: dict, dropped: bool) -> dict:
    runs = st["runs"]
    med = {k: common.median(v) for k, v in runs.items()}
    pf = st["prefill_s"]
    return {
        "context": st["context"], "context_tokens": st["n"], "stored_bytes": st["nbytes"], "files": len(st["files"]),
        "working_copy_bytes": st["working_bytes"],
        "raw_read_disk_ms": common.ms(med["raw_disk"]), "raw_read_cached_ms": common.ms(med["raw_cached"]),
        "restore_disk_ms": common.ms(med["restore_disk"]), "restore_cached_ms": common.ms(med["restore_cached"]),
        "read_verify_ms": common.ms(med["read_verify"]), "decode_ms": common.ms(med["decode"]),
        "reprefill_ms": common.ms(pf), "first_restore_disk_ms": common.ms(st["first_restore_s"]),
        "restore_over_raw_disk": round(med["restore_disk"] / med["raw_disk"], 2),
        "restore_over_raw_cached": round(med["restore_cached"] / med["raw_cached"], 2),
        "reprefill_over_restore_disk": round(pf / med["restore_disk"], 1),
        "raw_read_disk_MBps": round(st["nbytes"] / med["raw_disk"] / 1e6, 1),
        "page_cache_dropped": dropped,
        "runs_ms": {k: [common.ms(x) for x in v] for k, v in runs.items()},
    }


def report(result: dict) -> str:
    head = ["context", "stored MB", "raw read disk ms", "restore disk ms", "ratio", "raw read cached ms",
            "restore cached ms", "ratio", "read+verify ms", "decode ms", "first restore ms", "re-prefill ms",
            "prefill/restore"]
    rows = [[r["context_tokens"], r["stored_bytes"] / 1e6, r["raw_read_disk_ms"], r["restore_disk_ms"],
             f"{r['restore_over_raw_disk']}x", r["raw_read_cached_ms"], r["restore_cached_ms"],
             f"{r['restore_over_raw_cached']}x", r["read_verify_ms"], r["decode_ms"], r.get("first_restore_disk_ms", ""), r["reprefill_ms"],
             f"{r['reprefill_over_restore_disk']}x"] for r in result["rows"]]
    return common.table(head, rows, f"restore vs raw read (q4; median of {result.get('repeats', '?')} runs; target ratio <= 1.5x)")
