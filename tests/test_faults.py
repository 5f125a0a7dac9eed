"""Hostile input and faults (issue 18): persona files, non-regular cache files, two writers on one conversation,
a damaged catalog, its permissions, and options that would sample garbage.

Disk full and read-only storage, on a real small file system: tests/test_faults_disk.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.catalog import Catalog
from app.cli import main
from tests.engine_helpers import write_persona

ROOT = Path(__file__).resolve().parent.parent


def parley(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, capture_output=True, text=True,
                          env=os.environ.copy(), timeout=timeout)


@pytest.fixture
def tiny_persona(parley_home):
    write_persona(parley_home / "personas", "tester", max_tokens=5)
    return "tester"


def integrity_ok(parley_home: Path) -> bool:
    with sqlite3.connect(parley_home / "catalog.db") as conn:
        return [r[0] for r in conn.execute("PRAGMA integrity_check")] == ["ok"]


# -- 1. hostile persona files ------------------------------------------------------------------------------------------

def test_deeply_nested_persona_file_is_skipped_with_one_warning(tiny_model_dir, tiny_persona, parley_home, capsys):
    bomb = parley_home / "personas" / "bomb.toml"
    bomb.write_text('name="B"\nx = ' + "[" * 1000 + "]" * 1000 + "\n")
    tables = parley_home / "personas" / "tables.toml"
    tables.write_text('name="T"\ny = ' + "{a=" * 1000 + "1" + "}" * 1000 + "\n")
    assert main(["personas"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "RecursionError" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 2 and str(bomb) in captured.err and str(tables) in captured.err
    assert all("nested too deeply" in line and "remove it" in line for line in lines)
    assert "tester" in captured.out
    assert main(["--model", str(tiny_model_dir), "chat", tiny_persona, "hi"]) == 0
    assert str(bomb) in capsys.readouterr().err


@pytest.mark.slow  # a subprocess
def test_named_pipe_or_folder_called_toml_is_skipped_not_waited_on(tiny_model_dir, tiny_persona, parley_home):
    os.mkfifo(parley_home / "personas" / "x.toml")
    (parley_home / "personas" / "folder.toml").mkdir()
    listing = parley("personas", timeout=60)  # before: blocked for ever opening the pipe
    assert listing.returncode == 0, listing.stderr
    assert "x.toml: is not a regular file (a named pipe)" in listing.stderr
    assert "folder.toml: is not a regular file (a folder)" in listing.stderr
    assert "tester" in listing.stdout
    chat = parley("--model", str(tiny_model_dir), "chat", tiny_persona, "hi", timeout=120)
    assert chat.returncode == 0, chat.stderr
    assert chat.stderr.count("x.toml") == 1


# -- 2. non-regular files where cache files belong ---------------------------------------------------------------------

def _one_block(parley_home: Path) -> Path:
    return next(p for p in (parley_home / "caches" / "blocks").rglob("*.safetensors") if p.is_file())


def test_folder_where_a_block_should_be_is_a_miss_in_chat_verify_and_gc(tiny_model_dir, tiny_persona, parley_home, capsys):
    model = ["--model", str(tiny_model_dir)]
    assert main([*model, "chat", tiny_persona, "word " * 300]) == 0
    block = _one_block(parley_home)
    block.unlink()
    block.mkdir()
    (block / "inside").write_bytes(b"x")
    capsys.readouterr()
    assert main([*model, "chat", tiny_persona, "again"]) == 0  # before: "[Errno 21] Is a directory" for good
    err = capsys.readouterr().err  # start-up's reconcile removed the folder: the block is a miss, rebuilt
    assert ("not a regular file" in err or "is missing" in err) and "rebuilt" in err
    assert block.is_file(), "the turn rebuilt the block in its place"
    assert main([*model, "cache", "verify"]) == 0
    assert "0 problem" in capsys.readouterr().out

    block = _one_block(parley_home)
    block.unlink()
    block.mkdir()
    assert main([*model, "cache", "verify"]) == 1  # before: a traceback
    out = capsys.readouterr().out
    assert "is not a regular file (removed" in out and "dropped" in out
    assert not block.exists()
    assert main([*model, "cache", "verify"]) == 0
    capsys.readouterr()
    stray = parley_home / "caches" / "blocks" / "ab" / ("ab" + "0" * 62 + ".safetensors")
    stray.mkdir(parents=True)
    assert main([*model, "cache", "gc", "--now"]) == 0  # before: it stayed (and a folder is never unlinked)
    assert "freed" in capsys.readouterr().out and not stray.exists()
    assert main([*model, "chat", tiny_persona, "still there?"]) == 0
    assert integrity_ok(parley_home)


@pytest.mark.slow  # a subprocess
def test_named_pipe_where_a_block_should_be_does_not_hang(tiny_model_dir, tiny_persona, parley_home):
    model = ("--model", str(tiny_model_dir))
    assert parley(*model, "chat", tiny_persona, "word " * 300).returncode == 0
    block = _one_block(parley_home)
    block.unlink()
    os.mkfifo(block)
    chat = parley(*model, "chat", tiny_persona, "again", timeout=120)  # before: blocked reading the pipe
    assert chat.returncode == 0, chat.stderr
    assert "rebuilt" in chat.stderr and block.is_file()
    tail = next((parley_home / "caches" / "tails").glob("*.safetensors"))
    tail.unlink()
    os.mkfifo(tail)
    verify = parley(*model, "cache", "verify", timeout=60)
    assert verify.returncode == 1 and "not a regular file" in verify.stdout, verify.stdout + verify.stderr
    assert not tail.exists()
    assert parley(*model, "cache", "verify", timeout=60).returncode == 0
    assert parley(*model, "cache", "gc", "--now", timeout=60).returncode == 0
    assert integrity_ok(parley_home)


# -- 3. two processes on one conversation --------------------------------------------------------------------------

def _start_loop(model_dir, personas_dir, cid: int, label: str, turns: int, go: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.turns_child", str(model_dir), str(personas_dir), str(cid),
                             label, str(turns), str(go)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=os.environ.copy())


@pytest.mark.slow  # a subprocess
def test_two_processes_on_one_conversation_queue_and_every_reply_answers_its_own_message(tiny_model_dir, tmp_path,
                                                                                           parley_home):
    from app.engine.prompt import build_prompt, transcript_messages
    from app.model.loader import load_model
    from app.personas import load_personas, post_history, preamble_messages

    personas_dir = tmp_path / "personas"
    write_persona(personas_dir, "chef", max_tokens=16)
    write_persona(personas_dir, "captain", max_tokens=16)
    with Catalog() as catalog:
        chef, captain = catalog.create_conversation("chef"), catalog.create_conversation("captain")
    go = tmp_path / "go"
    turns = 6
    procs = [_start_loop(tiny_model_dir, personas_dir, chef, "A", turns, go),
             _start_loop(tiny_model_dir, personas_dir, chef, "B", turns, go),
             _start_loop(tiny_model_dir, personas_dir, captain, "C", turns, go)]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        go.write_text("")  # all three start their loops together
        outputs = [proc.communicate(timeout=600)[0].splitlines() for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for lines in outputs:
        assert len(lines) == turns and all(line.startswith("reply ") for line in lines), lines

    lm = load_model(str(tiny_model_dir))
    personas = load_personas([personas_dir]).personas
    with Catalog() as catalog:
        for cid, persona_id, labels in ((chef, "chef", "AB"), (captain, "captain", "C")):
            path = catalog.current_path(cid)
            assert len(path) == catalog.message_count(cid) == 2 * turns * len(labels), "every message is on view"
            assert [m.role for m in path] == ["user", "assistant"] * (turns * len(labels)), "no two users in a row"
            persona = personas[persona_id]
            for user, reply in zip(path[::2], path[1::2]):
                assert reply.parent_id == user.id
                # the prompt this reply was generated from is the path ending at its own user message
                prompt = build_prompt(lm.tokenizer, preamble_messages(persona),
                                      transcript_messages(catalog.path_to(user.id)), lm.context_window,
                                      reserve=persona.max_tokens, post_history=post_history(persona))
                stats = reply.meta["stats"]
                assert stats["reused_tokens"] + stats["prefilled_tokens"] == len(prompt.ids), (user.content, stats)
            said = sorted(m.content for m in path[::2])
            assert said == sorted(f"{label} turn {i}" for label in labels for i in range(1, turns + 1))
    assert main(["--model", str(tiny_model_dir), "cache", "verify"]) == 0
    assert integrity_ok(parley_home)


# -- 6. true messages for bad input ---------------------------------------------------------------------------------

@pytest.mark.slow  # a subprocess
def test_invalid_utf8_message_is_refused_as_such(tiny_model_dir, tiny_persona, parley_home):
    proc = subprocess.run([sys.executable, "-m", "app", "--model", str(tiny_model_dir), "chat", tiny_persona,
                           b"caf\xe9 \xff".decode("utf-8", "surrogateescape")], cwd=ROOT, capture_output=True,
                          env=os.environ.copy(), timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 65, err
    assert "not valid UTF-8" in err and "Internal error" not in err
    with Catalog() as catalog:
        assert catalog.query("SELECT count(*) AS n FROM messages")[0]["n"] == 0


@pytest.mark.parametrize("args, words", [
    (["--budget-mb", "-5"], "--budget-mb: must be a number of megabytes"),
    (["--budget-mb", "nan"], "--budget-mb: must be a number of megabytes"),
])
def test_bad_budget_is_refused_before_the_model_starts(tiny_model_dir, tiny_persona, args, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tiny_model_dir), *args, "chat", tiny_persona, "hi"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert words in err and "set_cache_limit" not in err


# -- 9. sampling options and scene names -------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value, words", [
    ("--max-tokens", "0", "--max-tokens: must be a whole number of at least 1"),
    ("--max-tokens", "-1", "--max-tokens: must be a whole number of at least 1"),
    ("--temperature", "nan", "--temperature: must be a number from 0 to 5"),
    ("--temperature", "-1", "--temperature: must be a number from 0 to 5"),
    ("--temperature", "inf", "--temperature: must be a number from 0 to 5"),
])
def test_sampling_options_that_make_no_sense_are_refused(tiny_model_dir, tiny_persona, option, value, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tiny_model_dir), "chat", tiny_persona, "hi", f"{option}={value}"])
    assert exit_info.value.code == 2
    assert words in capsys.readouterr().err
    with Catalog() as catalog:
        assert catalog.query("SELECT count(*) AS n FROM messages")[0]["n"] == 0


def test_sampling_with_nan_temperature_cannot_reach_the_engine():
    from app.engine.commands import Sampling
    from app.errors import ParleyError

    for bad in (dict(temperature=float("nan")), dict(temperature=-1.0), dict(max_tokens=0), dict(max_tokens=-1),
                dict(top_p=float("nan"))):
        with pytest.raises(ParleyError):
            Sampling(**bad)
    assert Sampling(temperature=0.0, max_tokens=1).max_tokens == 1


def test_scene_name_used_twice_is_refused(tiny_persona, parley_home, capsys):
    write_persona(parley_home / "personas", "other", max_tokens=5)
    assert main(["scene", "new", "Tavern", "tester", "other"]) == 0
    capsys.readouterr()
    assert main(["scene", "new", "tavern", "tester", "other"]) == 1
    assert "already a scene named 'Tavern'" in capsys.readouterr().err
    with Catalog() as catalog:
        assert len(catalog.list_conversations(kind="scene")) == 1


# -- 7. a damaged catalog -------------------------------------------------------------------------------------------

def damage_catalog(parley_home: Path, n_messages: int = 400) -> Path:
    """A catalog with a few hundred messages, then garbage over one of its middle pages (as a bad disk leaves it)."""
    with Catalog() as catalog:
        cid = catalog.create_conversation("tester")
        with catalog.transaction():
            for i in range(n_messages):
                catalog.add_message(cid, "user" if i % 2 == 0 else "assistant", f"message {i} " + "text " * 20)
        catalog.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    path = parley_home / "catalog.db"
    page = 4096
    with open(path, "r+b") as fh:
        pages = os.fstat(fh.fileno()).st_size // page
        fh.seek(page * (pages // 2))
        fh.write(os.urandom(page))
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow  # a subprocess
def test_damaged_catalog_is_found_at_start_left_alone_and_recovery_explained(tiny_model_dir, tiny_persona, parley_home):
    with Catalog():
        pass  # the backup Parley keeps is made at a clean start
    backup = parley_home / "catalog.db.backup"
    assert backup.is_file()
    os.utime(backup, (time.time() - 2 * 86400,) * 2)  # a day old: the next clean start refreshes it
    path = damage_catalog(parley_home)
    before = _digest(path)
    for args in (["personas"], ["--model", str(tiny_model_dir), "chat", tiny_persona, "hi"], ["cache", "ls"]):
        proc = parley(*args)
        assert proc.returncode == 69, (args, proc.stderr)
        assert "is damaged" in proc.stderr and ".recover" in proc.stderr and str(backup) in proc.stderr
        assert "Traceback" not in proc.stderr and "malformed\n" not in proc.stderr
    assert _digest(path) == before, "nothing wrote to the damaged catalog"
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0
    # the backup is a working catalog the user can put back
    with sqlite3.connect(backup) as conn:
        assert [r[0] for r in conn.execute("PRAGMA integrity_check")] == ["ok"]


@pytest.mark.slow  # a subprocess
def test_putting_back_the_backup_as_told_works(parley_home):
    with Catalog() as catalog:
        cid = catalog.create_conversation("tester")
        catalog.add_message(cid, "user", "kept in the backup")
    with Catalog():
        pass
    os.utime(parley_home / "catalog.db.backup", (time.time() - 2 * 86400,) * 2)
    subprocess.run([sys.executable, "-c", "from app.catalog import Catalog; Catalog().close()"], cwd=ROOT, check=True)
    path = damage_catalog(parley_home)
    proc = parley("personas")
    assert proc.returncode == 69
    steps = next(line for line in proc.stderr.splitlines() if "put back the copy" in line).split("):", 1)[1].strip()
    done = subprocess.run(["bash", "-c", steps], capture_output=True, text=True, timeout=120)  # exactly as told
    assert done.returncode == 0, done.stderr
    assert parley("personas").returncode == 0
    with Catalog() as catalog:
        assert [m.content for m in catalog.current_path(cid)] == ["kept in the backup"]
    assert Path(f"{path}.damaged").exists(), "the damaged file is kept aside, not deleted"


# -- 8. permissions -----------------------------------------------------------------------------------------------------

def test_catalog_and_its_side_files_are_private(parley_home):
    parley_home.mkdir(mode=0o755)
    os.chmod(parley_home, 0o755)
    with Catalog() as catalog:
        catalog.create_conversation("tester")
        for suffix in ("", "-wal", "-shm"):
            side = parley_home / f"catalog.db{suffix}"
            assert side.exists() and stat.S_IMODE(side.stat().st_mode) == 0o600, suffix


def test_an_existing_world_readable_catalog_is_tightened(parley_home):
    with Catalog():
        pass
    for suffix in ("", "-wal", "-shm"):
        side = parley_home / f"catalog.db{suffix}"
        if side.exists():
            os.chmod(side, 0o644)
    with Catalog() as catalog:
        catalog.create_conversation("tester")
    for suffix in ("", "-wal", "-shm", ".backup"):
        side = parley_home / f"catalog.db{suffix}"
        if side.exists():
            assert stat.S_IMODE(side.stat().st_mode) == 0o600, suffix


# -- 6. an immutable catalog ---------------------------------------------------------------------------------------------

def _chattr(flag: str, path: Path) -> bool:
    return shutil.which("chattr") is not None and subprocess.run(["chattr", flag, str(path)],
                                                                 capture_output=True).returncode == 0


@pytest.mark.slow  # a subprocess
def test_immutable_catalog_says_it_cannot_be_written(tiny_model_dir, tiny_persona, parley_home):
    with Catalog() as catalog:
        catalog.create_conversation("tester")
    path = parley_home / "catalog.db"
    if not _chattr("+i", path):
        pytest.skip("chattr +i is not allowed here (needs root on a file system with the immutable flag)")
    try:
        proc = parley("--model", str(tiny_model_dir), "chat", tiny_persona, "hi")
    finally:
        _chattr("-i", path)
    assert proc.returncode == 77, proc.stderr
    assert "cannot be written" in proc.stderr and "immutable" in proc.stderr
    assert "model could not be started" not in proc.stderr and "aside" not in proc.stderr
    assert integrity_ok(parley_home)
