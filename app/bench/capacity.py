"""`parley bench capacity`: how many 4K-token conversation caches fit in a RAM budget, per scheme.

One 4,096-token cache of the shipped text is prefilled by the engine's
`prefill` (f16 storage, so the working copy is the model's own keys and
values to fp16 precision); for each scheme its 16 sealed blocks are encoded
with that scheme (`scheme.encode`, the arrays the live cache seals and the
pool writes), giving one real `ConversationCache` per scheme. Sizes are the
arrays' real `nbytes`, not formulas:

* idle (compact) bytes: what `CacheManager` counts for a `CompactCache`
  (encoded blocks + full-precision tail), i.e. an idle persona in RAM;
* disk bytes: what `BlockPool.save` writes (safetensors files, headers included);
* active bytes: the pinned cache, i.e. the fp32 working copy the model attends
  over plus its encoded blocks.

"fit" is checked with the real `CacheManager`: distinct idle caches (each with
its own block addresses, so nothing is shared) are added until `ram_bytes()`
exceeds the budget. `fp32 (mlx-lm KVCache)` is an uncompressed cache as mlx-lm
keeps it on this CPU path; `f16` is the FP16 baseline of the paper.
"""

from __future__ import annotations

from app.bench import common

SCHEMES = ("q4", "k8v4", "q8", "f16")
BUDGET_BYTES = 1 << 30
CONTEXT = 4096


def run(lm, args) -> dict:
    budget = int(getattr(args, "capacity_budget_bytes", None) or BUDGET_BYTES)
    context = int(getattr(args, "capacity_context", None) or CONTEXT)
    with common.temp_home() as home:
        return measure(lm, home, context, budget, say=lambda m: common.log(args, m))


def measure(lm, home, context: int = CONTEXT, budget: int = BUDGET_BYTES, say=print) -> dict:
    import mlx.core as mx

    from app.catalog.caches import conversation_key
    from app.kvstore.conversation_cache import ConversationCache
    from app.kvstore.live_cache import BLOCK_TOKENS, SealingKVCache
    from app.kvstore.manager import CacheManager, CompactCache, Entry
    from app.kvstore.schemes import get_scheme

    ids = common.text_tokens(lm, context)
    base_pool = common.make_pool(lm, home / "f16", "f16")
    base, _ = common.fill(lm, base_pool, ids)
    n_blocks = context // BLOCK_TOKENS
    fp32_bytes = sum(l.offset * l.keys.shape[1] * (l.keys.shape[3] + l.values.shape[3]) * 4 for l in base.layers)
    rows = []
    for name in SCHEMES:
        scheme = get_scheme(name)
        pool = common.make_pool(lm, home / name, name)
        layers = []
        for layer in base.layers:
            sealed = []
            for b in range(n_blocks):
                s, e = b * BLOCK_TOKENS, (b + 1) * BLOCK_TOKENS
                sealed.append(scheme.encode(*layer.span(s, e)))  # span: compact caches hold sealed rows encoded
            mx.eval(sealed)
            tk, tv = layer.tail() if layer.offset > n_blocks * BLOCK_TOKENS else (None, None)
            layers.append(SealingKVCache.restore(scheme, sealed, tk, tv, pool.dtype))
        cache = ConversationCache(layers, pool.fingerprint, pool.scheme_id, list(ids))
        try:
            disk_bytes = pool.save("capacity", cache, None, "bench").bytes_written
        except TypeError:  # an exact multiple of 256 tokens has an empty tail, which blockfile.checksum cannot hash
            disk_bytes = sum(pool.block_path(h).stat().st_size for h in cache.block_hashes())
        manager = CacheManager(pool, budget)
        manager.entries["active"] = Entry(cache, None, "bench")
        active_bytes = manager.entry_bytes("active")
        compact = CompactCache.of(cache)
        manager.entries["idle"] = Entry(compact, None, "bench")
        idle_bytes = manager.entry_bytes("idle")
        manager.entries.clear()
        fit = 0
        while True:  # distinct conversations: same arrays, their own block addresses (nothing shared)
            c = CompactCache(compact.tokens, [f"{h}:{fit}" for h in compact.hashes], compact.sealed, compact.tails, compact.dtype)
            manager.entries[conversation_key(fit)] = Entry(c, fit, "bench")
            if manager.ram_bytes() > budget:
                break
            fit += 1
        manager.entries.clear()
        encoded = sum(a.nbytes for layer in layers for block in layer.sealed if block is not None for a in block.values())
        elements = context * lm.n_layers * lm.n_kv_heads * lm.head_dim * 2
        rows.append({
            "scheme": name, "bits_per_element_nominal": round(scheme.bits_per_element, 3),
            "bits_per_element_measured": round(encoded * 8 / elements, 3),
            "idle_bytes": idle_bytes, "disk_bytes": disk_bytes, "active_bytes": active_bytes,
            "fit_idle": fit, "fit_with_one_active": 1 + max(0, (budget - active_bytes) // idle_bytes) if active_bytes <= budget else 0,
        })
    rows.append({"scheme": "fp32 (mlx-lm KVCache)", "bits_per_element_nominal": 32.0, "bits_per_element_measured": 32.0,
                 "idle_bytes": fp32_bytes, "disk_bytes": None, "active_bytes": fp32_bytes,
                 "fit_idle": budget // fp32_bytes, "fit_with_one_active": budget // fp32_bytes})
    f16 = next(r for r in rows if r["scheme"] == "f16")
    for r in rows:
        r["vs_f16"] = round(r["fit_idle"] / f16["fit_idle"], 2) if f16["fit_idle"] else None
        r["bytes_ratio_vs_f16"] = round(f16["idle_bytes"] / r["idle_bytes"], 2)
    result = {"context_tokens": context, "budget_bytes": budget, "rows": rows}
    return result


def report(result: dict) -> str:
    head = ["scheme", "bits/elem", "idle MB", "disk MB", "active MB", f"fit in {result['budget_bytes'] / 2**30:g} GiB",
            "with 1 active", "vs f16"]
    rows = [[r["scheme"], r["bits_per_element_measured"], r["idle_bytes"] / 1e6,
             "-" if r["disk_bytes"] is None else r["disk_bytes"] / 1e6, r["active_bytes"] / 1e6, r["fit_idle"],
             r["fit_with_one_active"], f"{r['vs_f16']}x"] for r in result["rows"]]
    return common.table(head, rows, f"capacity: {result['context_tokens']}-token caches in RAM")
