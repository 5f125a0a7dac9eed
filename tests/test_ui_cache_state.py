"""The UI draws the catalog's cache state (app.catalog.caches) and reads the disk records without hiding bugs."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import pytest

from app.catalog import Catalog
from app.catalog.caches import CacheStore, CacheSummary, conversation_key
from app.ui.app import ParleyApp
from app.ui.widgets import cache_label
from app.ui.widgets.scene_tab import scene_caches


@dataclass(frozen=True)
class RamState:  # what app.engine.events.CacheState carries
    conversation_id: int
    persona_id: str
    tokens: int
    bytes: int


def write(store: CacheStore, conversation_id: int, persona_id: str, tokens: int, size: int) -> None:
    store.write(conversation_key(conversation_id, persona_id), conversation_id, persona_id, "fp", "q4", tokens,
                ["a"], f"{conversation_id}-{persona_id}.tail", 44, size)


def test_cache_label_says_where_and_how_big():
    assert cache_label(CacheSummary()) == "no cache"
    assert cache_label(CacheSummary("disk", 300, 1536)) == "disk 300 tok 2 KB"
    assert cache_label(CacheSummary("ram", 120, 13 * 1024 * 1024 + 400 * 1024, 7)) == "ram 120 tok 13.4 MB"


def test_scene_caches_per_member_ram_beats_disk_beats_none():
    with Catalog() as catalog:
        store = CacheStore(catalog)
        scene = catalog.create_conversation(None, kind="scene", members=["ann", "bob", "cy"])
        other = catalog.create_conversation(None, kind="scene", members=["cy"])
        write(store, scene, "ann", 10, 1)
        write(store, scene, "bob", 20, 2)
        write(store, other, "cy", 30, 3)  # another scene's seat: not this scene's
        rows = store.conversation_rows()
        ram = [RamState(scene, "bob", 25, 3)]
        assert scene_caches(["ann", "bob", "cy"], ram, rows, scene) == {"ann": "disk", "bob": "ram", "cy": "none"}
        assert scene_caches(("ann", "bob", "cy"), iter(ram), iter(rows), scene) == {"ann": "disk", "bob": "ram",
                                                                                   "cy": "none"}


def test_disk_caches_shows_nothing_for_a_closed_catalog_but_raises_a_bug():
    """The read runs on a worker thread: a catalog closed as the app quits means "no disk state this time";
    anything that is not SQLite refusing is a bug and must not be swallowed."""
    app = ParleyApp(start_engine=False)
    catalog = Catalog()
    store = CacheStore(catalog)
    cid = catalog.create_conversation("ann")
    write(store, cid, "ann", 10, 1)
    app.catalog = catalog
    assert [r["conversation_id"] for r in app.disk_caches()] == [cid]
    catalog.close()
    assert app.disk_caches() == []
    app.catalog = object()  # not a catalog at all: a programming error
    with pytest.raises(AttributeError):
        app.disk_caches()
