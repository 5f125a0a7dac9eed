"""`parley personas [--json]`: the personas Parley can talk as, and where each one's cache is.

Scripts read `--json`: a list of objects with at least id, name and cache
("ram" | "disk" | "none"). Problems with persona files go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("personas", help="list personas and their cache state")
    parser.add_argument("--json", action="store_true", help="print a JSON list (id, name, cache, ...)")
    parser.set_defaults(handler=run)


def cache_states(catalog) -> dict:
    """persona id -> cache state (app.catalog.caches.CacheSummary) as the catalog's cache records say: no engine
    runs here, so "disk" or nothing."""
    from app.catalog.caches import CacheStore, cache_states_by_persona

    return cache_states_by_persona(CacheStore(catalog).conversation_rows())


def rows(personas, states) -> list[dict]:
    out = []
    for persona in personas.values():
        state = states.get(persona.id)
        where = getattr(state, "where", None) if state is not None else None
        out.append(
            {
                "id": persona.id,
                "name": persona.name,
                "description": persona.description,
                "color": persona.color,
                "tags": list(persona.tags),
                "cache": where if where in ("ram", "disk") else "none",
                "cache_tokens": int(getattr(state, "tokens", 0) or 0) if state is not None else 0,
                "cache_bytes": int(getattr(state, "bytes", 0) or 0) if state is not None else 0,
                "source": str(persona.source) if persona.source else None,
            }
        )
    return out


def run(args: argparse.Namespace) -> int:
    from app.catalog import Catalog
    from app.personas import load_personas

    result = load_personas()
    for problem in result.problems:
        print(f"parley: warning: {problem}", file=sys.stderr)
    with Catalog() as catalog:
        table = rows(result.personas, cache_states(catalog))
    if args.json:
        print(json.dumps(table, ensure_ascii=False))
        return 0
    if not table:
        print("No personas. Add a .toml file to the personas folder or run `parley import CARD`.")
        return 0
    width_id = max(len(r["id"]) for r in table)
    width_name = max(len(r["name"]) for r in table)
    print(f"{'ID':<{width_id}}  {'NAME':<{width_name}}  CACHE")
    for r in table:
        cache = r["cache"] if r["cache"] == "none" else f"{r['cache']} ({r['cache_tokens']} tokens)"
        print(f"{r['id']:<{width_id}}  {r['name']:<{width_name}}  {cache}")
    return 0
