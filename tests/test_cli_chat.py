"""`parley chat` and `parley cache` from the shell, as separate processes (the real embedded model for one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import main
from tests.engine_helpers import write_persona

ROOT = Path(__file__).resolve().parent.parent


def parley(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.fixture
def tiny_persona(parley_home):
    write_persona(parley_home / "personas", "tester", max_tokens=5)
    return "tester"


@pytest.mark.slow  # a subprocess
def test_chat_json_then_resume_from_disk_in_a_new_process(tiny_model_dir, tiny_persona):
    first = parley("--model", str(tiny_model_dir), "chat", tiny_persona, "Hello", "--json")
    assert first.returncode == 0, first.stderr
    one = json.loads(first.stdout)
    assert set(one) == {"reply", "conversation", "ttft_ms", "queued_ms", "reused_tokens", "prefilled_tokens",
                        "generated_tokens", "decode_tps", "cache", "lore"}
    assert one["cache"] == "none" and one["generated_tokens"] == 5
    second = parley("--model", str(tiny_model_dir), "chat", tiny_persona, "Again", "--json")
    two = json.loads(second.stdout)
    assert two["conversation"] == one["conversation"] and two["cache"] == "disk"
    assert two["reused_tokens"] >= one["reused_tokens"] + one["prefilled_tokens"] + one["generated_tokens"] - 1
    third = parley("--model", str(tiny_model_dir), "chat", tiny_persona, "Fresh start", "--new", "--json")
    assert json.loads(third.stdout)["conversation"] != one["conversation"]


def test_chat_bad_input_fails_and_writes_nothing(tiny_model_dir, tiny_persona, parley_home, capsys):
    assert main(["--model", str(tiny_model_dir), "chat", "no-such-persona", "hi"]) == 1
    assert "no-such-persona" in capsys.readouterr().err
    assert main(["--model", str(tiny_model_dir), "chat", tiny_persona, "   "]) == 1
    assert "empty" in capsys.readouterr().err
    assert main(["--model", str(tiny_model_dir), "chat", tiny_persona, "word " * 3000]) == 1
    assert "context window" in capsys.readouterr().err
    from app.catalog import Catalog

    with Catalog() as catalog:
        assert catalog.query("SELECT count(*) AS n FROM messages")[0]["n"] == 0


def test_cache_ls_verify_gc(tiny_model_dir, tiny_persona, parley_home, capsys):
    assert main(["--model", str(tiny_model_dir), "chat", tiny_persona, "word " * 150, "--json"]) == 0
    capsys.readouterr()
    assert main(["--model", str(tiny_model_dir), "cache", "ls", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["key"].split(":")[0] for r in rows} == {"conv", "pre"}
    assert main(["--model", str(tiny_model_dir), "cache", "verify"]) == 0
    assert "0 problem" in capsys.readouterr().out
    block = next((parley_home / "caches" / "blocks").rglob("*.safetensors"))
    data = bytearray(block.read_bytes())
    data[-5] ^= 0xFF
    block.write_bytes(bytes(data))
    assert main(["--model", str(tiny_model_dir), "cache", "verify"]) == 1
    assert "checksum" in capsys.readouterr().out
    assert main(["--model", str(tiny_model_dir), "cache", "gc", "--now"]) == 0
    assert "freed" in capsys.readouterr().out


def test_personas_json_shows_the_cache_on_disk(tiny_model_dir, tiny_persona, capsys):
    assert main(["--model", str(tiny_model_dir), "chat", tiny_persona, "hi", "--json"]) == 0
    capsys.readouterr()
    assert main(["personas", "--json"]) == 0
    listed = {p["id"]: p for p in json.loads(capsys.readouterr().out)}
    assert listed[tiny_persona]["cache"] == "disk" and listed["assistant"]["cache"] == "none"


@pytest.mark.real_model
def test_embedded_model_resumes_much_faster_from_disk(embedded_model_dir):
    first = parley("--model", str(embedded_model_dir), "chat", "assistant", "What is the capital of France?",
                   "--json", "--temperature", "0", "--max-tokens", "12")
    assert first.returncode == 0, first.stderr
    one = json.loads(first.stdout)
    assert "Paris" in one["reply"]
    second = parley("--model", str(embedded_model_dir), "chat", "assistant", "Thanks!",
                    "--json", "--temperature", "0", "--max-tokens", "4")
    two = json.loads(second.stdout)
    assert two["cache"] == "disk" and two["reused_tokens"] >= one["reused_tokens"] + one["prefilled_tokens"]
    assert two["prefilled_tokens"] < one["prefilled_tokens"]


def test_personas_counts_scene_caches_the_way_the_sidebar_does(tiny_model_dir, parley_home, capsys):
    from app.catalog import Catalog

    write_persona(parley_home / "personas", "tester", max_tokens=5)
    write_persona(parley_home / "personas", "other", max_tokens=5)
    assert main(["--model", str(tiny_model_dir), "chat", "tester", "hi", "--json"]) == 0
    assert main(["--model", str(tiny_model_dir), "scene", "new", "Room", "tester", "other"]) == 0
    assert main(["--model", str(tiny_model_dir), "scene", "Room", "hello all", "--json"]) == 0
    capsys.readouterr()
    assert main(["personas", "--json"]) == 0
    listed = {p["id"]: p for p in json.loads(capsys.readouterr().out)}
    with Catalog() as catalog:  # what the app's persona list adds up: every conversation cache of the persona
        rows = catalog.query("SELECT tokens, bytes FROM caches WHERE persona_id = 'tester' "
                             "AND conversation_id IS NOT NULL")
    assert len(rows) == 2, rows  # its chat and its seat in the scene
    assert listed["tester"]["cache"] == "disk"
    assert listed["tester"]["cache_tokens"] == sum(r["tokens"] for r in rows)
    assert listed["tester"]["cache_bytes"] == sum(r["bytes"] for r in rows)
