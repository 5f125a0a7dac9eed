"""How a cache state (app.catalog.caches.CacheSummary: RAM, disk or none, and how big) reads in the sidebar.

The state itself and the rule that picks it (RAM beats disk beats none) belong to the catalog, so the app and
`parley personas` cannot disagree; the UI only draws it.
"""

from __future__ import annotations

from app.catalog.caches import CacheSummary
from app.ui.widgets.text import human_bytes


def cache_label(summary: CacheSummary) -> str:
    """"no cache", or where the cache is and its size ("ram 120 tok 1.5 MB")."""
    if summary.where == "none":
        return "no cache"
    return f"{summary.where} {summary.tokens} tok {human_bytes(summary.bytes)}"
