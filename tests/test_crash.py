"""SIGKILL during turns and cache saves (the moment the child reports a saved message) never corrupts a cache
or loses a message."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import mlx.core as mx
import pytest

from app.catalog import Catalog
from app.engine import commands as cmd
from app.engine import events as ev
from app.kvstore.pool import LoadMiss
from app.model.loader import load_model
from tests.engine_helpers import EngineRunner, write_persona
from tests.kv_helpers import fill, make_pool, next_logits

ROOT = Path(__file__).resolve().parent.parent
KILLS = 12
CHILD_TIMEOUT_S = 120  # a child that reports nothing for this long has hung: the test fails instead of waiting

pytestmark = pytest.mark.slow  # child processes killed a dozen times


def run_child_and_kill(model_dir, personas_dir, cid, kill_after: int) -> list[int]:
    """Start a child chatting in a loop; SIGKILL it the moment it reports its `kill_after`-th saved message.

    The child prints "saved <id>" once a message is in the catalog: an odd count lands during the reply (the
    user's message is saved, the reply is being written), an even one while the reply's cache is being saved
    (the reply is saved first, then its blocks). No sleeps: where the kill lands is chosen, not guessed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.crash_child", str(model_dir), str(personas_dir), str(cid)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=os.environ.copy(),
    )
    lines: list[str] = []
    kill_now = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line.strip())
            if sum(x.startswith("saved ") for x in lines) >= kill_after or line.startswith("failed"):
                kill_now.set()
        kill_now.set()  # the child ended on its own: nothing more will come

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    signalled = kill_now.wait(timeout=CHILD_TIMEOUT_S)
    proc.send_signal(signal.SIGKILL)
    returncode = proc.wait(timeout=CHILD_TIMEOUT_S)
    reader.join(timeout=5)
    assert signalled, f"the child reported {lines} in {CHILD_TIMEOUT_S}s, not {kill_after} saved messages"
    assert not any(line.startswith("failed") for line in lines), lines
    assert returncode == -signal.SIGKILL, f"the child ended by itself (exit {returncode}) before the kill: {lines}"
    return [int(line.split()[1]) for line in lines if line.startswith("saved ")]


def test_sigkill_never_corrupts_a_cache_or_loses_a_message(tiny_model_dir, tmp_path):
    personas_dir = tmp_path / "personas"
    write_persona(personas_dir, "tester", max_tokens=24)
    with Catalog() as catalog:
        cid = catalog.create_conversation("tester")
    rng = random.Random(1234)
    lm = load_model(str(tiny_model_dir))
    checked = 0
    for _ in range(KILLS):
        saved = run_child_and_kill(tiny_model_dir, personas_dir, cid, kill_after=rng.randint(1, 6))
        with Catalog() as catalog:
            ids = {m.id for m in catalog.current_path(cid)} | {m.id for m in _all_messages(catalog, cid)}
        assert set(saved) <= ids, "a message reported saved was lost"
        pool = make_pool(lm)
        pool.reconcile(grace=0)
        loaded = pool.load(f"conv:{cid}")
        if loaded is None or isinstance(loaded, LoadMiss):
            continue
        # whatever loads passed every checksum; it must also be the state its tokens describe
        # (a fresh prefill in other chunk sizes differs only by where blocks were sealed)
        fresh = fill(lm, pool, loaded.tokens)
        probe = [5, 6, 7]
        gap = mx.abs(next_logits(lm, loaded, probe) - next_logits(lm, fresh, probe)).max().item()
        assert gap < 0.1, f"restored cache does not match its tokens (max logit gap {gap})"
        checked += 1
    assert checked >= KILLS // 2  # most kills leave a usable cache behind
    runner = EngineRunner(tiny_model_dir, personas_dir)
    try:
        final, _ = runner.run(cmd.Generate(cid, "after all those crashes"))
    finally:
        runner.close()
    assert isinstance(final, ev.ReplyFinished)


def _all_messages(catalog, cid):
    return [catalog.get_message(r["id"]) for r in catalog.query("SELECT id FROM messages WHERE conversation_id = ?", (cid,))]


def test_two_processes_on_one_home_never_corrupt_each_other(tiny_model_dir, tmp_path):
    personas_dir = tmp_path / "personas"
    write_persona(personas_dir, "tester", max_tokens=24)
    with Catalog() as catalog:
        a, b = catalog.create_conversation("tester"), catalog.create_conversation("tester")
    results: list[list[int]] = []

    def chat(cid):
        results.append(run_child_and_kill(tiny_model_dir, personas_dir, cid, kill_after=4))

    threads = [threading.Thread(target=chat, args=(cid,)) for cid in (a, a, b)]  # two writers on one conversation too
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lm = load_model(str(tiny_model_dir))
    pool = make_pool(lm)
    checked, problems = pool.verify()
    assert problems == [] and checked > 0
    with Catalog() as catalog:
        stored = {r["id"] for r in catalog.query("SELECT id FROM messages")}
    assert len(results) == 3 and all(saved and set(saved) <= stored for saved in results)
