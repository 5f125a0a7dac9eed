"""`parley cache ls | verify | gc`: look after the stored KV caches.

Caches are disposable: anything `verify` finds damaged is dropped and rebuilt
from the transcript on the next reply. No model is loaded: the model's
fingerprint is read from its files.
"""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser("cache", help="list, verify or clean up stored caches")
    sub = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    ls = sub.add_parser("ls", help="list stored caches: persona, conversation, tokens, bytes")
    ls.add_argument("--json", action="store_true")
    sub.add_parser("verify", help="check every stored block and tail; drop damaged ones")
    gc = sub.add_parser("gc", help="remove blocks no cache uses and leftovers of interrupted saves")
    gc.add_argument("--now", action="store_true", help="also files younger than 10 minutes (no other Parley running)")
    p.set_defaults(handler=run)


def run(args) -> int:
    from app.catalog import Catalog

    with Catalog() as catalog:
        if args.cache_command == "ls":
            return list_caches(catalog, args.json)
        pool = offline_pool(catalog, args)
        if args.cache_command == "verify":
            checked, problems = pool.verify()
            for line in problems:
                print(line)
            print(f"checked {checked} files: {len(problems)} problem(s)")
            return 1 if problems else 0
        files, freed = pool.gc(grace=0 if args.now else 600)
        print(f"freed {files} files, {_mb(freed)}")
        return 0


def offline_pool(catalog, args):
    """A BlockPool for the configured model and scheme, without loading the model into MLX."""
    from app import paths
    from app.catalog.caches import CacheStore
    from app.kvstore.pool import BlockPool
    from app.kvstore.schemes import get_scheme
    from app.model.loader import model_fingerprint, resolve_model_folder

    folder = resolve_model_folder(args.model)
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config") or {}  # mlx-community gemma3 nests the text model's settings
    n_layers = int(config.get("num_hidden_layers") or text.get("num_hidden_layers") or config.get("n_layers"))
    return BlockPool(CacheStore(catalog), paths.caches_dir(), model_fingerprint(folder), get_scheme(args.kv_scheme), n_layers)


def list_caches(catalog, as_json: bool) -> int:
    from app.catalog.caches import CacheStore

    rows = CacheStore(catalog).listing()
    if as_json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no stored caches")
        return 0
    print(f"{'cache':<28} {'persona':<18} {'tokens':>7} {'size':>9}  scheme")
    for r in rows:
        print(f"{r['key']:<28} {str(r['persona_id']):<18} {r['tokens']:>7} {_mb(r['bytes']):>9}  {r['scheme']}")
    print(f"{len(rows)} caches, {_mb(sum(r['bytes'] for r in rows))} on disk (shared blocks counted in each)")
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
