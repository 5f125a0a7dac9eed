"""The catalog: migrations, the message tree, and consistency across threads."""

from __future__ import annotations

import sqlite3
import threading

import pytest
import sqlite_utils

from app.catalog import Catalog, short_title
from app.catalog.migrations import MIGRATIONS, applied, migrate
from app.errors import ParleyError


@pytest.fixture
def catalog(tmp_path):
    with Catalog(tmp_path / "catalog.db") as cat:
        yield cat


def schema(db: sqlite_utils.Database) -> dict[str, str]:
    return {
        name: " ".join(sql.split())
        for name, sql in db.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL AND name != '_migrations'")
    }


# -- migrations ---------------------------------------------------------------


def test_default_path_honours_parley_home(parley_home):
    with Catalog() as cat:
        assert cat.path == parley_home / "catalog.db"
    assert (parley_home / "catalog.db").exists()


def test_migrate_empty_database(tmp_path):
    with Catalog(tmp_path / "c.db") as cat:
        assert applied(cat.db) == {m.__name__ for m in MIGRATIONS}
        assert {"personas", "conversations", "messages", "scene_members"} <= set(cat.db.table_names())
        assert cat.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert cat.db.journal_mode == "wal"
        assert cat.db.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000


def test_migration_names_are_unique_and_ordered():
    names = [m.__name__ for m in MIGRATIONS]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert names[0] == "m001_initial"


@pytest.mark.parametrize("version", range(len(MIGRATIONS)))
def test_migrate_from_every_earlier_version(tmp_path, version):
    fresh = Catalog(tmp_path / "fresh.db")
    old_path = tmp_path / "old.db"
    old = sqlite_utils.Database(old_path)
    migrate(old, upto=version)
    assert len(applied(old)) == version
    conversation = None
    if version >= 1:  # data written at m001 must survive every later migration
        stamp = "2024-01-01T00:00:00+00:00"
        old.execute(
            "INSERT INTO conversations (persona_id, kind, title, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
            ("assistant", "chat", "kept", stamp, stamp),
        )
        conversation = old.execute("SELECT max(id) FROM conversations").fetchone()[0]
    old.close()
    with Catalog(old_path) as upgraded:
        assert applied(upgraded.db) == {m.__name__ for m in MIGRATIONS}
        assert schema(upgraded.db) == schema(fresh.db)
        if conversation is not None:
            assert upgraded.get_conversation(conversation).title == "kept"
            upgraded.add_message(conversation, "user", "still works")
    fresh.close()


def test_reopening_does_not_migrate_again(tmp_path):
    Catalog(tmp_path / "c.db").close()
    with Catalog(tmp_path / "c.db") as cat:
        assert migrate(cat.db) == []
        count = cat.db.execute("SELECT count(*) FROM _migrations").fetchone()[0]
        assert count == len(MIGRATIONS)


def test_concurrent_first_open_migrates_once(tmp_path):
    path = tmp_path / "race.db"
    errors, barrier = [], threading.Barrier(6)

    def open_it():
        try:
            barrier.wait()
            Catalog(path).close()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with Catalog(path) as cat:
        assert cat.db.execute("SELECT count(*) FROM _migrations").fetchone()[0] == len(MIGRATIONS)


def test_not_a_database_is_a_user_error(tmp_path):
    bad = tmp_path / "c.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ParleyError, match="c.db"):
        Catalog(bad)


# -- conversations and the tree ------------------------------------------------


def test_turns_branches_and_alternatives(catalog):
    cid = catalog.create_conversation("assistant")
    u1 = catalog.add_message(cid, "user", "What is the capital of France?")
    a1 = catalog.add_message(cid, "assistant", "Paris.")
    assert [m.id for m in catalog.current_path(cid)] == [u1, a1]
    assert catalog.get_conversation(cid).leaf_id == a1

    # regenerate: a sibling reply under the same user message becomes the leaf
    a2 = catalog.add_message(cid, "assistant", "It is Paris.", parent_id=u1, meta={"ttft_ms": 12.5})
    assert [m.content for m in catalog.current_path(cid)] == ["What is the capital of France?", "It is Paris."]
    assert [m.id for m in catalog.alternatives(a1)] == [a1, a2]
    assert catalog.get_message(a2).meta == {"ttft_ms": 12.5}

    # continue on the second branch, then browse back to the first
    u2 = catalog.add_message(cid, "user", "And Spain?")
    a3 = catalog.add_message(cid, "assistant", "Madrid.")
    catalog.set_leaf(cid, catalog.leaf_after(a1))
    assert [m.id for m in catalog.current_path(cid)] == [u1, a1]
    catalog.set_leaf(cid, catalog.leaf_after(a2))
    assert [m.id for m in catalog.current_path(cid)] == [u1, a2, u2, a3]
    assert [m.id for m in catalog.path_to(u2)] == [u1, a2, u2]

    # edit a past user message: a root-level sibling
    u1b = catalog.add_message(cid, "user", "What is the capital of Italy?", parent_id=None)
    assert [m.id for m in catalog.alternatives(u1)] == [u1, u1b]
    assert [m.id for m in catalog.current_path(cid)] == [u1b]
    assert catalog.leaf_after(u1) == a3  # newest child at each step
    assert [m.id for m in catalog.children(u1)] == [a1, a2]
    assert catalog.message_count(cid) == 6


def test_alternatives_keep_roles_apart(catalog):
    cid = catalog.create_conversation("assistant")
    u = catalog.add_message(cid, "user", "hi")
    a = catalog.add_message(cid, "assistant", "hello", parent_id=u)
    s = catalog.add_message(cid, "system", "note", parent_id=u)
    assert [m.id for m in catalog.alternatives(a)] == [a]
    assert [m.id for m in catalog.alternatives(s)] == [s]
    assert catalog.alternatives(999) == []


def test_parent_must_belong_to_the_conversation(catalog):
    one = catalog.create_conversation("assistant")
    two = catalog.create_conversation("assistant")
    m = catalog.add_message(one, "user", "hi")
    with pytest.raises(ParleyError, match="not part of conversation"):
        catalog.add_message(two, "assistant", "x", parent_id=m)
    with pytest.raises(ParleyError, match="not part of conversation"):
        catalog.set_leaf(two, m)
    with pytest.raises(ParleyError, match="does not exist"):
        catalog.add_message(12345, "user", "x")
    with pytest.raises(ParleyError, match="role"):
        catalog.add_message(one, "robot", "x")
    assert catalog.message_count(two) == 0


def test_title_from_first_user_message(catalog):
    cid = catalog.create_conversation("assistant")
    catalog.add_message(cid, "assistant", "Greetings!")
    assert catalog.get_conversation(cid).title is None
    catalog.add_message(cid, "user", "  Please   explain\nthe difference between weather and climate in detail  ")
    title = catalog.get_conversation(cid).title
    assert title.startswith("Please explain the difference") and title.endswith("…") and len(title) <= 48
    catalog.add_message(cid, "user", "Second question")
    assert catalog.get_conversation(cid).title == title
    catalog.rename_conversation(cid, "Climate")
    assert catalog.get_conversation(cid).title == "Climate"
    kept = catalog.create_conversation("assistant", title="Given")
    catalog.add_message(kept, "user", "hello")
    assert catalog.get_conversation(kept).title == "Given"


def test_short_title():
    assert short_title("hi") == "hi"
    assert short_title("   ") == "Untitled"
    assert len(short_title("x" * 500)) <= 48


def test_list_latest_and_delete(catalog):
    a = catalog.create_conversation("captain")
    b = catalog.create_conversation("captain")
    c = catalog.create_conversation("tutor")
    s = catalog.create_conversation(None, kind="scene", members=["captain", "tutor", "captain"])
    assert [x.id for x in catalog.list_conversations()] == [s, c, b, a]
    catalog.add_message(a, "user", "back to the first")
    assert catalog.latest_conversation("captain").id == a
    assert [x.id for x in catalog.list_conversations(persona_id="captain")] == [a, s, b]
    assert [x.id for x in catalog.list_conversations(kind="scene")] == [s]
    assert catalog.list_conversations(kind="scene")[0].members == ("captain", "tutor")
    assert catalog.scene_members(s) == ["captain", "tutor"]
    assert catalog.latest_conversation("nobody") is None
    assert catalog.latest_conversation("captain", kind="scene").id == s

    catalog.add_message(s, "user", "hello room")
    catalog.add_message(s, "assistant", "Ahoy", persona_id="captain")
    assert catalog.current_path(s)[-1].persona_id == "captain"
    assert catalog.delete_conversation(s)
    assert not catalog.delete_conversation(s)
    assert catalog.get_conversation(s) is None
    assert catalog.db.execute("SELECT count(*) FROM messages WHERE conversation_id = ?", (s,)).fetchone()[0] == 0
    assert catalog.db.execute("SELECT count(*) FROM scene_members WHERE conversation_id = ?", (s,)).fetchone()[0] == 0


def test_ids_are_never_reused(catalog):
    cid = catalog.create_conversation("assistant")
    mid = catalog.add_message(cid, "user", "x")
    catalog.delete_conversation(cid)
    again = catalog.create_conversation("assistant")
    assert again > cid
    assert catalog.add_message(again, "user", "y") > mid


def test_bad_kind_and_chat_without_persona(catalog):
    with pytest.raises(ParleyError):
        catalog.create_conversation("assistant", kind="party")
    with pytest.raises(ParleyError):
        catalog.create_conversation(None)


def test_foreign_keys_are_enforced(catalog):
    with pytest.raises(sqlite3.IntegrityError):
        catalog.db.execute(
            "INSERT INTO messages (conversation_id, role, content, created_at) VALUES (999, 'user', 'x', 'now')"
        )


def test_transaction_rolls_back_as_a_whole(catalog):
    cid = catalog.create_conversation("assistant")
    with pytest.raises(RuntimeError):
        with catalog.transaction():
            catalog.add_message(cid, "user", "half a turn")
            raise RuntimeError("reply failed")
    assert catalog.current_path(cid) == []
    assert catalog.get_conversation(cid).title is None


def test_update_message_meta_merges(catalog):
    cid = catalog.create_conversation("assistant")
    mid = catalog.add_message(cid, "assistant", "x", meta={"a": 1})
    catalog.update_message_meta(mid, {"b": 2})
    assert catalog.get_message(mid).meta == {"a": 1, "b": 2}


def test_upsert_persona_reports_the_previous_hash(catalog):
    class P:
        id, name, source = "captain", "Captain", "/x/captain.toml"

    assert catalog.upsert_persona(P(), preamble_hash="aaa") is None
    assert catalog.upsert_persona(P(), preamble_hash="bbb") == "aaa"
    record = catalog.get_persona_record("captain")
    assert (record.name, record.preamble_hash, record.source) == ("Captain", "bbb", "/x/captain.toml")
    assert list(catalog.persona_records()) == ["captain"]


# -- concurrency ----------------------------------------------------------------


def test_readers_never_see_half_a_turn(tmp_path):
    """Two writer threads (own Catalog each) add user+assistant turns; a reader checks every snapshot."""
    path = tmp_path / "c.db"
    with Catalog(path) as setup:
        conversations = [setup.create_conversation("assistant") for _ in range(2)]
    turns, stop, seen, problems = 60, threading.Event(), [], []

    def writer(cid: int) -> None:
        with Catalog(path) as cat:
            for i in range(turns):
                with cat.transaction():
                    cat.add_message(cid, "user", f"question {i}")
                    cat.add_message(cid, "assistant", f"answer {i}")

    def reader() -> None:
        with Catalog(path) as cat:
            while not stop.is_set():
                for cid in conversations:
                    path_ = cat.current_path(cid)
                    roles = [m.role for m in path_]
                    seen.append(len(roles))
                    if roles != ["user", "assistant"] * (len(roles) // 2) or len(roles) % 2:
                        problems.append(roles)

    threads = [threading.Thread(target=writer, args=(cid,)) for cid in conversations]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert problems == []
    assert max(seen) > 0
    with Catalog(path) as cat:
        for cid in conversations:
            assert len(cat.current_path(cid)) == 2 * turns


def test_one_catalog_shared_between_threads_is_safe(catalog):
    cid = catalog.create_conversation("assistant")
    errors = []

    def add(n):
        try:
            for i in range(50):
                catalog.add_message(cid, "user", f"{n}-{i}", parent_id=None)
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and catalog.message_count(cid) == 200


def test_sync_personas_reports_changed_preambles(catalog):
    import dataclasses

    from app.personas import Persona

    ada, bob = Persona(id="ada", name="Ada", system_prompt="one"), Persona(id="bob", name="Bob")
    assert catalog.sync_personas([ada, bob]) == set()  # new ones are not "changed"
    assert catalog.sync_personas([dataclasses.replace(ada, color="#000000"), bob]) == set()
    assert catalog.sync_personas([dataclasses.replace(ada, system_prompt="two"), bob]) == {"ada"}
    assert catalog.get_persona_record("ada").preamble_hash == dataclasses.replace(ada, system_prompt="two").preamble_hash()
    assert catalog.query("SELECT count(*) AS n FROM personas") == [{"n": 2}]


def test_sqlite_utils_loads_its_cli_dependencies_only_when_used(tmp_path):
    """app.catalog imports sqlite-utils without click and dateutil's parser; both load, real, on first use."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    code = f"""
import json, sys
import app.catalog
from app.catalog import Catalog
with Catalog({str(tmp_path / "c.db")!r}) as cat:
    cat.create_conversation("assistant")
early = sorted(m for m in ("click", "dateutil.parser") if m in sys.modules)
import sqlite_utils, sqlite_utils.recipes, sqlite_utils.utils
date = sqlite_utils.recipes.parsedate("2024-01-02")  # dateutil's parser, imported now
bar = sqlite_utils.utils.click.progressbar  # click, imported now
import click
from sqlite_utils.plugins import get_plugins
print(json.dumps({{"early": early, "date": date, "bar": bar is click.progressbar, "click_real": hasattr(click, "__file__"),
                  "group": click.Group.__module__, "plugins": get_plugins(), "stand_ins": [
                      m for m in ("click", "dateutil.parser") if not hasattr(sys.modules[m], "__file__")]}}))
"""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["early"] == []
    assert got["date"] == "2024-01-02" and got["bar"] and got["click_real"] and got["group"] == "click.core"
    assert got["plugins"] == [] and got["stand_ins"] == []
