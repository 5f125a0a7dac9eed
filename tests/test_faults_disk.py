"""A full disk and read-only storage, on a real small file system, through the real `parley` command line.

Each scenario runs in a private mount namespace (`unshare -rm`: no root needed where user namespaces are
allowed) with $PARLEY_HOME on a 24 MB tmpfs; see tests/fault_child.py. After each one the disk is freed
and `parley cache verify` and SQLite's integrity_check must be clean, and the next turn must work.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine_helpers import write_persona

ROOT = Path(__file__).resolve().parent.parent
WRONG_ADVICE = ("aside", "start a fresh catalog", "Internal error", "Traceback", "terminate called")


def _namespaces_work() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null "
                            "|| mount -t tmpfs -o size=1m tmpfs \"$TMPDIR\""], capture_output=True,
                           env={**os.environ, "TMPDIR": "/tmp"})
    return probe.returncode == 0


pytestmark = [pytest.mark.skipif(not _namespaces_work(), reason="needs unshare -rm (user and mount namespaces)"),
              pytest.mark.slow]  # every test runs a subprocess


def run_scenario(name: str, tiny_model_dir, parley_home: Path, tmp_path: Path) -> dict:
    write_persona(tmp_path / "personas-seed", "tester", max_tokens=12)
    parley_home.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "out" / "result.json"
    out.parent.mkdir()
    assert parley_home.parent == tmp_path  # the child finds the personas next to the home it mounts over
    proc = subprocess.run(["unshare", "-rm", sys.executable, "-m", "tests.fault_child", "scenario", name, str(out),
                           str(tiny_model_dir)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def assert_clean_after(result: dict) -> None:
    assert result["verify"]["rc"] == 0, result["verify"]
    assert "0 problem(s)" in result["verify"]["out"]
    assert result["integrity"]["rows"] == ["ok"]
    assert result["chat_after"]["rc"] == 0, result["chat_after"]["err"]
    rows = result["final"]["rows"]
    assert [r[2] for r in rows[-2:]] == ["user", "assistant"] and rows[-1][1] == rows[-2][0] and rows[-2][3] == "and now?"


def no_wrong_advice(text: str) -> None:
    for words in WRONG_ADVICE:
        assert words not in text, text


def test_cache_that_cannot_be_saved_on_a_full_disk_is_a_warning(tiny_model_dir, parley_home, tmp_path):
    result = run_scenario("cache_full", tiny_model_dir, parley_home, tmp_path)
    chat = result["chat"]
    assert chat["rc"] == 0, chat["err"]
    assert chat["streamed"].strip() and chat["streamed"] in chat["out"]
    assert "warning" in chat["err"] and "cache was not" in chat["err"]
    no_wrong_advice(chat["err"])
    assert [row[2] for row in result["messages"]["rows"][:2]] == ["user", "assistant"]
    assert_clean_after(result)


def test_read_only_caches_folder_is_a_warning(tiny_model_dir, parley_home, tmp_path):
    result = run_scenario("caches_read_only", tiny_model_dir, parley_home, tmp_path)
    chat = result["chat"]
    assert chat["rc"] == 0, chat["err"]
    assert "cache was not" in chat["err"] and "Read-only" in chat["err"]
    no_wrong_advice(chat["err"])
    assert_clean_after(result)


def test_disk_full_while_the_reply_streams_prints_it_and_says_it_was_not_saved(tiny_model_dir, parley_home, tmp_path):
    result = run_scenario("full_during_reply", tiny_model_dir, parley_home, tmp_path)
    chat = result["chat"]
    assert chat["rc"] == 74, chat["err"]
    assert chat["streamed"].strip() and chat["streamed"] in chat["out"], "the reply is printed"
    assert "could not be saved" in chat["err"] and "full" in chat["err"]
    no_wrong_advice(chat["err"])
    rows = result["messages"]["rows"]
    assert [r[3] for r in rows if r[2] == "user"][:2] == ["hello there", "tell me more"], "the user's message is kept"
    assert not any(r[2] == "assistant" and r[1] == rows[2][0] for r in rows), "no reply under it was stored"
    assert_clean_after(result)


def test_disk_full_at_start_says_so_and_not_to_move_the_catalog(tiny_model_dir, parley_home, tmp_path):
    result = run_scenario("full_at_start", tiny_model_dir, parley_home, tmp_path)
    chat = result["chat"]
    assert chat["rc"] == 74, chat["err"]
    assert "is full" in chat["err"] and "nothing is damaged" in chat["err"]
    no_wrong_advice(chat["err"])
    listing = result["personas"]  # SQLite cannot even make its shared-memory file: the same true message
    assert listing["rc"] in (0, 74) and ("is full" in listing["err"] or listing["rc"] == 0), listing["err"]
    no_wrong_advice(listing["err"])
    assert_clean_after(result)


def test_read_only_catalog_says_so(tiny_model_dir, parley_home, tmp_path):
    result = run_scenario("catalog_read_only", tiny_model_dir, parley_home, tmp_path)
    chat = result["chat"]
    assert chat["rc"] == 77, chat["err"]
    assert "cannot be written" in chat["err"] and "read-only" in chat["err"]
    assert "model could not be started" not in chat["err"]
    no_wrong_advice(chat["err"])
    assert_clean_after(result)
